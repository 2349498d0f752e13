"""`make mutants`: does the test suite notice when the method breaks?

A small mutation runner over curated mutants of the parts that must be exact: the score, the
statistic, the allocation rules, PAD filtering, the reduction of sharded statistics, mask upkeep,
inheritance, resume and re-thresholding. Each mutant is one exact text edit of one file. For
each, the package and tests are copied to a scratch folder, the edit is applied there (the working
tree is never touched) and the mutant's tests run; a failing run kills the mutant.

    python tools/mutants.py [--only ID ...] [--report docs/mutants.md] [--jobs 1]

Writes a markdown report: kill rate, every mutant with its outcome and time, and for each survivor
the reason it is equivalent (declared with the mutant) or "NOT KILLED". Exit status 1 when a
mutant without a declared reason survives. Not part of CI's test command (it takes ~15 minutes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ("tests/pruning", "--ignore=tests/pruning/test_fsdp2.py", "--ignore=tests/pruning/test_core_ddp.py")


@dataclass(frozen=True)
class Mutant:
    """One exact edit: `old` must occur exactly once in `path`; `tests` are pytest arguments."""

    id: str
    path: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...] = FAST
    equivalent: str = ""  # why surviving is fine (an equivalent mutant); empty: it must be killed


S, ST, AL, EN, RE, UP, CB, TG, AT, BA, NA = (
    "mflightning/pruning/scores.py",
    "mflightning/pruning/stats.py",
    "mflightning/pruning/allocation.py",
    "mflightning/pruning/engine.py",
    "mflightning/pruning/result.py",
    "mflightning/pruning/upkeep.py",
    "mflightning/callback.py",
    "mflightning/pruning/targets.py",
    "mflightning/pruning/attention.py",
    "mflightning/pruning/batches.py",
    "mflightning/pruning/naming.py",
)
PV = "mflightning/pruning/provenance.py"

MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- the score (Eq. 4-6)
    Mutant("score-s_in", S, "s_in = weighted.mean(dim=0)", "s_in = torch.ones_like(weighted.mean(dim=0))",
           "S_in replaced by a constant"),
    Mutant("score-s_out", S, "s_out = weighted.mean(dim=1)", "s_out = torch.ones_like(weighted.mean(dim=1))",
           "S_out replaced by a constant"),
    Mutant("score-no-magnitude", S, "return magnitude.mul_(s_out.unsqueeze(1)).mul_(s_in.unsqueeze(0))",
           "return torch.ones_like(magnitude).mul_(s_out.unsqueeze(1)).mul_(s_in.unsqueeze(0))",
           "|W| dropped from the MultiFlow score"),
    Mutant("score-s_in-unweighted", S, "weighted = magnitude * input_norm", "weighted = magnitude * 1.0 + 0 * input_norm",
           "saliencies computed from |W| without the input norms"),
    Mutant("wanda-no-norm", S,
           "return weight.detach().abs().float() * input_norm.to(device=weight.device, dtype=torch.float32).unsqueeze(0)",
           "return weight.detach().abs().float()", "Wanda without the activation norm"),
    Mutant("lamp-prefix", S, "suffix = ordered.flip(0).cumsum(0).flip(0)", "suffix = ordered.cumsum(0)",
           "LAMP divides by a prefix instead of a suffix sum"),
    Mutant("snip-no-weight", S, "(gradient.to(weight.device, torch.float32) * weight.detach().float()).abs()",
           "gradient.to(weight.device, torch.float32).abs()", "SNIP without the weight factor"),
    Mutant("invert-ignored", EN, "scores = {name: -s for name, s in scores.items()}", "scores = dict(scores)",
           "the inversion ablation does nothing"),
    # ---------------------------------------------------------------- the statistic
    Mutant("stat-abs", ST, "return features.square().sum(0)", "return features.abs().sum(0)",
           "sum of |x| instead of sum of x^2"),
    Mutant("stat-no-sqrt", EN, "norms = {name: stats.sums[name].sqrt() for name in targets}",
           "norms = {name: stats.sums[name] for name in targets}", "squared norms used as norms"),
    Mutant("stat-last-batch", ST, "acc.add_(squared(x, bool(role), seq_first_input))",
           "acc.copy_(squared(x, bool(role), seq_first_input))",
           "only the last call of a layer counts"),
    Mutant("pad-filter-off", ST, "        if not filter_tokens or mask is None:\n            return 0",
           "        if True:\n            return 0",
           "padding tokens are never filtered"),
    Mutant("cross-attn-filtered", "mflightning/pruning/presets.py",
           'r"crossattention\\.self\\.(key|value)\\.weight$",', 'r"$^",',
           "cross-attention key/value (image tokens) filtered by the text mask"),
    Mutant("reduce-skipped", ST, "    if reduce is None or not tensors:\n        return tensors",
           "    if True:\n        return tensors", "sharded statistics are not summed over processes",
           tests=("tests/pruning/test_engine_sharding.py", "tests/pruning/test_core_ddp.py")),
    Mutant("shard-all", BA, "        if index % world == rank:\n            yield index, batch",
           "        yield index, batch", "every process calibrates on every batch",
           tests=("tests/pruning/test_core_ddp.py", "tests/pruning/test_engine_sharding.py")),
    # ---------------------------------------------------------------- allocation (Eq. 7-8, ablations, ties)
    Mutant("alloc-one-pool", AL, 'pool_groups = groups if allocation == "modality" else',
           'pool_groups = {name: "all" for name in scores} if allocation == "modality" else',
           "modality allocation pools every group together"),
    Mutant("alloc-global-per-layer", AL, 'if allocation == "global":\n        return global_masks(scores, sparsity)',
           'if allocation == "global":\n        return masks_from_counts(scores, uniform_counts(scores, sparsity))',
           "the w/o-distribution ablation prunes a uniform ratio per layer"),
    Mutant("ties-kept-global", AL, "return {name: s > threshold for name, s in scores.items()}",
           "return {name: s >= threshold for name, s in scores.items()}", "ties at the global threshold kept"),
    Mutant("ties-kept-layer", AL, "return {name: s > kth_smallest(s, counts[name]) for name, s in scores.items()}",
           "return {name: s >= kth_smallest(s, counts[name]) for name, s in scores.items()}",
           "ties at a layer threshold kept"),
    Mutant("ratio-ties", AL, "counts[name] = int((magnitudes[name] <= threshold).sum().item())",
           "counts[name] = int((magnitudes[name] < threshold).sum().item())",
           "Eq. 7 counts magnitudes strictly below the pool threshold"),
    Mutant("kth-off-by-one", AL, "return torch.kthvalue(values.reshape(-1).float(), min(k, values.numel())).values",
           "return torch.kthvalue(values.reshape(-1).float(), min(k + 1, values.numel())).values",
           "the threshold is the (k+1)-th smallest value"),
    Mutant("row-by-column", AL, "k = int(s.shape[1] * sparsity)", "k = int(s.shape[0] * sparsity)",
           "Wanda's row groups count the wrong dimension"),
    # ---------------------------------------------------------------- mask upkeep
    Mutant("upkeep-no-grad-zero", UP,
           "_fused_mul([(local(p.grad), kept) for p, kept in pairs if p.grad is not None], self._buffers)",
           "pass", "gradients of pruned weights are not zeroed"),
    Mutant("upkeep-no-rezero", UP, "_fused_mul([(local(p), kept) for p, kept in pairs], self._buffers)", "pass",
           "pruned weights are not re-zeroed (after steps, or when masks are applied)"),
    Mutant("upkeep-stale-groups", UP, "if cached is None or cached[0] != signature:", "if cached is None:",
           "parameters that join an optimizer later are never masked"),
    Mutant("callback-no-post-hook", CB,
           "self._handles.append(optimizer.register_step_post_hook(self._after_step))", "pass",
           "the callback never re-zeroes weights after optimizer steps"),
    Mutant("callback-reuse-leaks", CB, "same = self._keeper is not None and current is pl_module",
           "same = self._keeper is not None", "a reused callback keeps the first module's masks"),
    Mutant("callback-ckpt-ignored", CB, "if same and self._restored is None:", "if same:",
           "fit(ckpt_path=X) on a module the callback already pruned keeps the old masks, not X's"),
    Mutant("upkeep-nan-survives", UP, "return tensor.view(width) if width is not None else tensor", "return tensor",
           "a NaN or inf at a pruned entry survives the upkeep (NaN * 0 = NaN)"),
    Mutant("upkeep-binds-unsharded", UP, "        reshard(model)  # bind", "        pass  # bind",
           "under FSDP2 the masks bind to unsharded root parameters (never masked; crash at train end)",
           tests=("tests/pruning/test_fsdp2.py",)),
    # ---------------------------------------------------------------- inheritance, resume, re-threshold
    Mutant("inherit-off", NA, "            if source in resolved:\n                resolved[name] = resolved[source]",
           "            pass", "decoder copies do not inherit their encoder layer's masks",
           tests=FAST + ("tests/models", "tests/tasks/test_tasks.py")),
    Mutant("resume-ignored", CB, '            self._restored = {**state_dict, "masks": _unpacked(state_dict)}',
           "            pass", "a checkpoint's masks are ignored when resuming"),
    Mutant("callback-rethreshold-ignored", CB,
           "if self.sparsity is None or abs(self.sparsity - result.target_sparsity) < 1e-9:\n            return result",
           "if True:\n            return result", "masks= with another sparsity applies the file's masks as they are"),
    # ---------------------------------------------------------------- models nobody here wrote (issue 9)
    Mutant("mha-fastpath-on", AT, "backend.set_fastpath_enabled(False)", "backend.set_fastpath_enabled(previous)",
           "torch's fused attention fast paths stay on during calibration (they skip the hooked modules)"),
    Mutant("mha-inputs-repeated", AT, 'self._record(roles["in_proj"], _distinct((query, key, value)))',
           'self._record(roles["in_proj"], [query, key, value])',
           "a packed in_proj weight counts a self-attention input three times"),
    Mutant("keyword-input-lost", ST, 'x = args[0] if args else kwargs.get("input")', "x = args[0] if args else None",
           "keyword calls fc(input=x) are not measured"),
    Mutant("modes-top-level-only", ST,
           "        for module, training in saved:  # parents before children",
           "        for module, training in saved[:0]:  # parents before children",
           "calibration restores only the top-level train/eval flag"),
    Mutant("tied-embedding-pruned", TG, "if id(weight) in embeddings and not spec.prune_tied_embeddings:",
           "if False:", "a Linear tied to an embedding is pruned"),
    Mutant("image-groups-ignored", TG, "filter_tokens = group not in spec.image_groups and",
           "filter_tokens = True and", "image groups are PAD-filtered like text"),
    Mutant("presharded-resharded", BA,
           "    if presharded is not None:\n        yield from _iterate_presharded(",
           "    if False:\n        yield from _iterate_presharded(", "a DistributedSampler loader is sharded again"),
    Mutant("lockstep-off", BA, "        yield None, last  # the last group",
           "        pass  # the last group", "a rank with one batch fewer skips the forward the others run (FSDP2 hangs)"),
    Mutant("coverage-unchecked", RE, "        if not partial:\n            self._check_coverage(",
           "        if False:\n            self._check_coverage(", "a partial mask file is applied silently"),
    Mutant("prefix-first-wins", NA, "    if len(fitting) == 1:\n        return next(iter(fitting.values()))",
           "    if len(fitting) >= 1:\n        return next(iter(fitting.values()))",
           "with two candidate prefixes the first is taken silently"),
    Mutant("itersnip-at-allowed", RE, 'if self.method == "itersnip" and not math.isclose(',
           'if False and not math.isclose(', ".at() re-thresholds IterSNIP's last-round scores"),
    Mutant("nearly-empty-silent", EN, "if sparsity >= NEARLY_EMPTY or not masks:", "if True:",
           "no warning for layers left more than 99% pruned"),
    Mutant("callback-no-reduce", CB, 'reduce=(lambda t: strategy.reduce(t, reduce_op="sum")) if world > 1 else None',
           "reduce=None", "the callback does not sum statistics over processes",
           tests=("tests/pruning/test_core_ddp.py",)),
    Mutant("fsdp2-masks-unsharded", UP, "    if not is_dtensor(param):\n        return mask.to(param.device, torch.bool)",
           "    if True:\n        return mask.to(param.device, torch.bool)", "FSDP2 masks are not sharded like their parameters",
           tests=("tests/pruning/test_fsdp2.py",)),
    # ---------------------------------------------------------------- N:M and packed checkpoints (issue 11)
    Mutant("nm-keeps-lowest", AL, "keep = groups.topk(n, dim=-1).indices",
           "keep = groups.topk(n, dim=-1, largest=False).indices", "N:M keeps the lowest scores of each run"),
    Mutant("nm-violations-blind", AL, "count = int((kept > n).sum())", "count = int((kept > n + 1).sum())",
           "the pattern check misses runs keeping one too many"),
    Mutant("unpack-inverted", UP, "bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)",
           "bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).eq(0).reshape(-1)",
           "bit-packed checkpoint masks restore inverted"),
    # ---------------------------------------------------------------- checkpoints, protocol, families (issues 10, 13, 14)
    Mutant("momentum-no-decay", "mflightning/tasks/momentum.py", "    torch._foreach_mul_(targets, kept)\n",
           "", "the momentum update adds without decaying (p_m + (1-m) p)",
           tests=("tests/tasks/test_retrieval_momentum.py",)),
    Mutant("queue-ptr-stuck", "mflightning/tasks/momentum.py", "        self.ptr.fill_((start + n) % self.size)",
           "        self.ptr.fill_(start % self.size)", "the queue pointer never advances (every batch overwrites one slot)",
           tests=("tests/tasks/test_retrieval_momentum.py",)),
    Mutant("gather-grad-not-summed", "mflightning/tasks/distributed.py",
           "        dist.all_reduce(grad, op=dist.ReduceOp.SUM)\n", "",
           "the gathered rows' gradients from other processes' losses are dropped",
           tests=("tests/tasks/test_ddp_retrieval.py",)),
    Mutant("copies-not-zeroed", UP,
           "            _fused_mul([(local(p), kept) for p, kept in self.copies.values()], self._buffers)",
           "            pass", "EMA / momentum copies keep their pruned weights after an update",
           tests=("tests/pruning/test_copies.py",)),
    Mutant("flattened-tokens-unfiltered", ST, "            return 3 if x.shape[0] == mask.numel() else 0",
           "            return 0", "padding counted in (B*L, D) inputs (OPT's fc1/fc2)",
           tests=("tests/pruning/test_statistic_exact.py", "tests/models/test_hf_families.py")),
    Mutant("question-mask-dropped", "mflightning/models/blip.py",
           '        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")', "        pass",
           "the BLIP VQA decoder attends to the question's PAD states", tests=("tests/models/test_question_mask.py",)),
    Mutant("resize-drops-cls", "mflightning/models/state.py", "    out = torch.cat([table[:1], patches], dim=0)",
           "    out = torch.cat([table[1:2], patches], dim=0)", "a position resize replaces CLS's entry",
           tests=("tests/models/test_state.py", "tests/models/test_blip_original.py")),
    Mutant("hf-no-recogniser", "mflightning/__init__.py", "register_recogniser(_recognise_transformers_family)",
           "pass", "transformers' CLIP/SigLIP/BLIP-2/LLaVA are not recognised (modalities=None)",
           tests=("tests/models/test_hf_families.py",)),
    Mutant("rethreshold-same", RE,
           "self.scores, sparsity, self.allocation, groups=self.groups, magnitudes=self.magnitudes",
           "self.scores, self.target_sparsity, self.allocation, groups=self.groups, magnitudes=self.magnitudes",
           ".at() re-thresholds at the old sparsity"),
    # ---------------------------------------------------------------- fine-tuning as the authors (issue 23)
    Mutant("text-dropout-zero", "mflightning/models/blip_original.py", "TEXT_DROPOUT = 0.1", "TEXT_DROPOUT = 0.0",
           "BLIP's text dropout falls back to transformers' 0.0", tests=("tests/models/test_blip_original.py",)),
    Mutant("drop-path-uniform", "mflightning/models/stochastic_depth.py",
           "    rates = layer_rates(rate, len(layers))", "    rates = [float(rate)] * len(layers)",
           "every ViT layer drops at the full rate instead of linspace(0, rate, depth)",
           tests=("tests/models/test_blip.py",)),
    Mutant("loaded-queue-positive", "mflightning/tasks/momentum.py", "        self.idx_queue.fill_(-1)",
           "        self.idx_queue.fill_(0)", "the pretraining queue's rows count as image 0's positives",
           tests=("tests/models/test_blip_original.py",)),
    Mutant("xvlm-decoder-always-inherits", "mflightning/tasks/xvlm_tasks.py",
           "            self.pruning_preset = DENSE_DECODER_PRESET", "            pass",
           "inherit_decoder_masks=False still masks the XVLM VQA decoder", tests=("tests/tasks/test_xvlm_tasks.py",)),
    Mutant("augment-always-applied", "mflightning/data/transforms.py",
           "            if float(torch.rand(())) > self.prob:", "            if False:",
           "the authors' RandomAugment applies every drawn op (p=1 instead of 0.5)",
           tests=("tests/data/test_authors_augment_and_text.py",)),
    # ---------------------------------------------------------------- fine-tuning as the authors (issue 23, part A)
    Mutant("vg-weight-unset", "mflightning/data/datasets.py", "VG_ANSWER_WEIGHT = 0.5", "VG_ANSWER_WEIGHT = None",
           "Visual Genome answers weighted like VQA's again", tests=("tests/data/test_vqa_authors_protocol.py",)),
    Mutant("vqa-flip-careless", "mflightning/data/datasets.py",
           "return self.hflip and not mentions_left_or_right(record.question, record.answers or ())",
           "return self.hflip", "VQA flips questions about left/right",
           tests=("tests/data/test_vqa_authors_protocol.py",)),
    Mutant("momentum-swapped-as-ema", "mflightning/tasks/momentum.py",
           'kept = momentum if rule == "ema" else 1.0 - momentum', "kept = momentum",
           "the authors' swapped momentum rule runs as the EMA", tests=("tests/tasks/test_authors_protocol.py",)),
    Mutant("xvlm-gather-exact", "mflightning/tasks/retrieval.py",
           'if many and self.gather_backward == "local":', "if False:",
           "gather_backward='local' gives the exact gradient", tests=("tests/tasks/test_gather_backward.py",)),
    Mutant("rank-first-token-once", "mflightning/tasks/vqa.py", "scores = scores + topk_prob.log()", "pass",
           "XVLM's ranking counts the first token once", tests=("tests/tasks/test_authors_protocol.py",)),
    Mutant("beam-sequence-as-generated", "mflightning/models/generation.py",
           "finished_length = seqs.size(1) if by_sequence else generated", "finished_length = generated",
           "4.31's beam scores divide by the generated tokens", tests=("tests/models/test_generation.py",)),
    # ---------------------------------------------------------------- issue 22: traced text tokens, degenerate
    # scores, file checksums
    Mutant("traced-ids-not-text", PV, '        if "ids" in kinds:\n            return True',
           '        if False:\n            return True', "inputs traced to the token ids are not filtered",
           tests=("tests/pruning/test_token_provenance.py",)),
    Mutant("traced-images-filtered", PV, '        if kinds == {"other"}:\n            return False',
           '        if kinds == {"other"}:\n            return True', "inputs traced only to images are PAD-filtered",
           tests=("tests/pruning/test_token_provenance.py",)),
    Mutant("shape-coincidence-decides", ST, "            if role is None and squared.slot(x, True, seq_first_input) and not undecided:",
           "            if False:", "an untraceable input is filtered by shape instead of asking for image_groups",
           tests=("tests/pruning/test_token_provenance.py", "tests/pruning/test_calibration_robust.py")),
    Mutant("degenerate-overshoot-unchecked", EN, "if not flat and realised <= sparsity + OVERSHOOT:",
           "if not flat:", "ties pushing sparsity far over the target pass silently",
           tests=("tests/pruning/test_degenerate.py",)),
    Mutant("degenerate-flat-unchecked", EN, "if spread == 0 and size > 1 and kept < size]", "if False]",
           "layers whose scores are all equal pass when the overall figure holds",
           tests=("tests/pruning/test_degenerate.py",)),
    Mutant("checksum-unchecked", "mflightning/pruning/checksum.py", "    if actual != stored:", "    if False:",
           "a corrupted mask file loads", tests=("tests/pruning/test_checksum.py",)),
    # ---------------------------------------------------------------- transformers export (issue 26)
    Mutant("export-config-format-unchecked", "mflightning/export/writer.py",
           '    if sparsity["format"] not in FORMATS:', "    if False:",
           "a compressed export's config.json names code compressed-tensors imports and calls",
           tests=("tests/test_export_transformers.py",)),
    Mutant("export-untied-lm-head", "mflightning/export/transformers_export.py",
           "        if alias in own and not torch.equal(state[alias], state[target]):", "        if False:",
           "a BLIP LM head transformers re-ties to the word embeddings is exported as another model",
           tests=("tests/test_export_transformers.py",)),
    Mutant("export-vqa-cls-first", "mflightning/export/transformers_export.py",
           "    tokenizer.cls_token = tokenizer.convert_ids_to_tokens(backbone.enc_token_id)", "    pass",
           "the exported VQA processor starts questions with [CLS], not BLIP's [ENC]",
           tests=("tests/test_export_transformers.py",)),
    # ---------------------------------------------------------------- the authors' pruning pipeline (issue 21)
    Mutant("shared-weight-every-call", TG,
           '(shared.modules if shared_weight_inputs == "every_module" else shared.shared_by).append(module)',
           "shared.modules.append(module)",
           "a weight shared by several modules (tied BLIP) accumulates the decoder's calls too",
           tests=("tests/pruning/test_shared_weights.py",)),
    Mutant("alias-bias-skipped", "mflightning/models/state.py", "            folded[first] = value",
           "            pass", "an LM-head bias a file holds only as decoder.bias stays at its initial value",
           tests=("tests/models/test_blip_original.py", "tests/models/test_xvlm_checkpoints.py", "-k", "multiflow_code")),
    Mutant("sparsegpt-no-block-update", "mflightning/pruning/sparsegpt.py",
           "        W[:, end:] -= errors @ U[start:end, end:]", "        pass",
           "SparseGPT's pruning errors never reach the columns right of their block",
           tests=("tests/pruning/test_weight_updating.py",)),
    Mutant("sparsegpt-no-dampening", "mflightning/pruning/sparsegpt.py", "    H.diagonal().add_(damp)", "    pass",
           "SparseGPT's Hessian is not dampened", tests=("tests/pruning/test_weight_updating.py",)),
    Mutant("chita-no-first-order", "mflightning/pruning/chita.py",
           "    alpha = A.sum(0) / batch_size  # the first-order term", "    alpha = A.sum(0) * 0  # the first-order term",
           "CHITA drops the first-order term of its quadratic model", tests=("tests/pruning/test_weight_updating.py",)),
    Mutant("carried-weights-not-written", "mflightning/pruning/result.py", "        write_weights(model, carried)",
           "        pass", "apply() and the callback zero the masks but keep the original kept weights",
           tests=("tests/pruning/test_weight_updating.py",)),
    Mutant("vit-no-recogniser", "mflightning/__init__.py", "register_recogniser(_recognise_vision_family)",
           "pass", "transformers/timm/torchvision ViTs are not recognised (modalities=None)",
           tests=("tests/models/test_vit_families.py",)),
    Mutant("vit-larger-model-taken", "mflightning/models/vit_families.py",
           "    if not presets or _outside(model, found, presets[0]):", "    if not presets:",
           "a ViT inside a larger model is taken for a vision-only one", tests=("tests/models/test_vit_families.py",)),
    Mutant("torchvision-features-not-cls", "mflightning/models/vit_families.py",
           "    return module.encoder(torch.cat([cls, tokens], dim=1))[:, 0]",
           "    return module.encoder(torch.cat([cls, tokens], dim=1))[:, 1]",
           "torchvision ViT features read a patch token, not CLS", tests=("tests/models/test_vit_families.py",)),
    Mutant("cifar-rows-not-channel-major", "mflightning/data/classification.py",
           ".reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)", ".reshape(-1, 32, 32, 3)",
           "CIFAR pickle rows read as HWC: scrambled pixels", tests=("tests/data/test_classification_data.py",)),
)


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.id}: the text to replace occurs {count} times in {mutant.path} (expected 1)")
    path.write_text(text.replace(mutant.old, mutant.new))


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'timeout', seconds, last output lines) of one mutant."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        scratch = Path(tmp)
        for part in ("mflightning", "tests"):
            shutil.copytree(ROOT / part, scratch / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", scratch / "pyproject.toml")
        apply(mutant, scratch)
        env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
        probe = subprocess.run([sys.executable, "-c", "import mflightning; print(mflightning.__file__)"],
                               cwd=scratch, env=env, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(scratch)):
            raise SystemExit(f"the scratch copy is not the one imported: {probe.stdout or probe.stderr}")
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        return ("survived" if done.returncode == 0 else "killed"), time.perf_counter() - start, tail


def report(results: list[tuple[Mutant, str, float, str]], wall: float) -> str:
    killed = sum(1 for _, status, _, _ in results if status != "survived")
    lines = [
        "# Mutation check",
        "",
        f"`make mutants` (`python tools/mutants.py`): {killed} of {len(results)} curated mutants killed "
        f"({100 * killed / max(1, len(results)):.0f}%), {wall / 60:.1f} min wall time.",
        "",
        "Each mutant is one exact edit (listed in `tools/mutants.py`) of the engine, the callback or the mask "
        "upkeep; it is killed when its tests fail.",
        "",
        "| mutant | what it breaks | outcome | seconds |",
        "|---|---|---|---|",
    ]
    for mutant, status, seconds, _ in results:
        outcome = status
        if status == "survived":
            outcome = f"survived: equivalent, {mutant.equivalent}" if mutant.equivalent else "**survived: NOT KILLED**"
        what = mutant.what.replace("|", "\\|")  # |W| inside a table cell
        lines.append(f"| `{mutant.id}` | {what} | {outcome} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="mutant ids to run (default: all)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "mutants.md")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.id:<26} {m.path:<36} {m.what}")
        return 0
    for m in mutants:  # every edit must still apply before anything runs
        text = (ROOT / m.path).read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"mutant {m.id}: the text to replace occurs {text.count(m.old)} times in {m.path}")
    start = time.perf_counter()

    def one(m: Mutant):
        status, seconds, tail = run(m, args.timeout)
        print(f"{m.id:<26} {status:<9} {seconds:6.1f}s  {tail.splitlines()[-1] if tail else ''}", flush=True)
        return m, status, seconds, tail

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, mutants))
    text = report(results, time.perf_counter() - start)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(text)
    return 1 if any(status == "survived" and not m.equivalent for m, status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
