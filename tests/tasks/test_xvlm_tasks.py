"""XVLM retrieval, captioning and VQA modules: one mask file for all, training, evaluation by hand."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

import mflightning
from blip_task_fixtures import (ANSWERS, caption_loaders, calibration_batch, make_tokenizer, retrieval_loaders,
                                trainer_kwargs, vqa_items, vqa_loaders)
from mflightning.metrics import retrieval_recall, vqa_accuracy
from mflightning.models.xvlm import XVLMBackbone, tiny_config
from mflightning.tasks.xvlm_tasks import (XVLMCaptioningModule, XVLMRetrievalModule, XVLMVQAModule, beam_search,
                                          linear_warmup_lambda)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer):
    """A tiny 'pretrained' XVLM (2 text + 2 fusion layers) and ONE mask file computed on it."""
    directory = tmp_path_factory.mktemp("xvlm")
    torch.manual_seed(0)
    backbone = XVLMBackbone(tiny_config(len(tokenizer), num_text_layers=2, num_fusion_layers=2))
    calibration = [calibration_batch(tokenizer, n=4, seed=s) for s in (1, 2)]
    result = mflightning.prune(backbone, sparsity=0.6, calibration=calibration)
    return SimpleNamespace(path=str(backbone.save_pretrained(directory / "backbone")),
                           masks=str(result.save(directory / "xvlm_masks.safetensors")), result=result)


class GradientCoverage(pl.Callback):
    """Trainable parameters left without a gradient (plain DDP would fail on them)."""

    def __init__(self):
        self.missing = set()

    def on_after_backward(self, trainer, pl_module):
        self.missing |= {n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None}


def fit_with_masks(module, pretrained, tmp_path, train, val=None, **overrides):
    callback, coverage = mflightning.MultiFlowCallback(masks=pretrained.masks), GradientCoverage()
    options = dict(callbacks=[callback, coverage], precision="bf16-mixed")
    if val is None:
        options["limit_val_batches"] = 0
    options.update(overrides)
    pl.Trainer(**trainer_kwargs(tmp_path, **options)).fit(module, train, val)
    assert not coverage.missing, f"{type(module).__name__}: no gradient for {sorted(coverage.missing)[:5]}"
    assert not any(p.requires_grad for n, p in module.backbone.named_parameters() if n.startswith("bbox_head."))
    return callback


def assert_sparse(module, pretrained, callback):
    """Pruned weights are exactly zero after training, kept ones are not, per group near the file's sparsity."""
    masks = pretrained.result.masks_for(module)
    params = dict(module.named_parameters())
    assert set(callback.kept_masks) == set(masks)
    for name, mask in masks.items():
        assert not params[name][~mask].any(), f"pruned weights of {name} moved"
        assert params[name][mask].ne(0).float().mean() > 0.99, name
    measured = callback.measured_sparsity(module)
    assert set(measured) == {"vision", "text", "fusion", "total"}
    for group in ("vision", "text", "fusion"):
        assert measured[group] == pytest.approx(0.6, abs=0.01), group
    return masks


def test_retrieval_trains_sparse_and_eval_ranks_by_itm_alone(tmp_path, tokenizer, pretrained):
    pl.seed_everything(0)
    module = XVLMRetrievalModule(backbone=pretrained.path, tokenizer=tokenizer, lr=1e-3, k_test=3)
    train, val = retrieval_loaders(tokenizer)
    before = module.backbone.fusion_encoder.layer["2"].crossattention.self.query.weight.detach().clone()
    callback = fit_with_masks(module, pretrained, tmp_path, train, val)
    assert_sparse(module, pretrained, callback)
    after = module.backbone.fusion_encoder.layer["2"].crossattention.self.query.weight
    assert not torch.equal(before != 0, after != 0) and not torch.equal(before * (after != 0), after)
    got = module.eval_results["val"]
    assert set(got) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean",
                        "r_mean"}

    # Brute force: ITM of every pair, each query's ITC top-3 scored by the ITM logit alone.
    module.eval()
    bb = module.backbone
    with torch.no_grad():
        batches = list(val)
        img_embeds = torch.cat([bb.encode_image(b["image"]) for b in batches])
        ids = torch.cat([b["text_input_ids"] for b in batches])
        att = torch.cat([b["text_attention_mask"] for b in batches])
        sims = bb.image_features(img_embeds) @ bb.text_features(bb.encode_text(ids, att)).t()
        itm = torch.stack([bb.itm_logits(bb.fuse(bb.encode_text(ids, att), att, img.expand(len(ids), -1, -1)))[:, 1]
                           for img in img_embeds.split(1)])
    txt2img = torch.cat([b["text_image_idx"] for b in batches]).tolist()
    s_i2t, s_t2i = torch.full_like(sims, -math.inf), torch.full_like(sims.t(), -math.inf)
    for i in range(sims.size(0)):
        for t in sims[i].topk(3).indices:
            s_i2t[i, t] = itm[i, t]
    for t in range(sims.size(1)):
        for i in sims[:, t].topk(3).indices:
            s_t2i[t, i] = itm[i, t]
    img2txt = [[t for t, i in enumerate(txt2img) if i == img] for img in range(sims.size(0))]
    expected_txt = retrieval_recall(s_i2t, txt2img, img2txt)
    expected_img = retrieval_recall(s_t2i.t().contiguous(), txt2img, img2txt)
    for k in (1, 5, 10):
        assert got[f"txt_r{k}"] == pytest.approx(expected_txt[f"txt_r{k}"])
        assert got[f"img_r{k}"] == pytest.approx(expected_img[f"img_r{k}"])


def test_captioning_trains_sparse_generates_and_writes_results(tmp_path, tokenizer, pretrained):
    pl.seed_everything(0)
    module = XVLMCaptioningModule(backbone=pretrained.path, tokenizer=tokenizer, lr=1e-3, max_length=10,
                                  output_dir=str(tmp_path / "out"))
    train, val = caption_loaders(tokenizer)
    callback = fit_with_masks(module, pretrained, tmp_path, train, val)
    assert_sparse(module, pretrained, callback)
    results = json.loads((tmp_path / "out" / "val_captions_epoch0.json").read_text())
    assert sorted(r["image_id"] for r in results) == list(range(100, 106))
    lengths = [len(tokenizer(r["caption"], add_special_tokens=False).input_ids) for r in results]
    assert all(1 <= n <= 10 - module.prompt_length for n in lengths)
    assert {"bleu4", "cider", "meteor", "rouge_l"} <= set(module.eval_results["val"])


def test_caption_loss_excludes_prompt_and_padding(tokenizer, pretrained):
    module = XVLMCaptioningModule(backbone=pretrained.path, tokenizer=tokenizer, label_smoothing=0.0).eval()
    module.log = lambda *a, **k: None
    b = calibration_batch(tokenizer, n=2)
    enc = tokenizer(["a picture of a red square", "a picture of blue"], padding="max_length", max_length=12,
                    return_tensors="pt")
    loss = module.training_step({**b, "input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, 0)
    ids, att = enc.input_ids, enc.attention_mask
    logits = module.backbone.caption_logits(ids, att, module.backbone.encode_image(b["image"])).float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = att[:, 1:].bool().clone()
    keep[:, : module.prompt_length - 1] = False
    assert module.prompt_length == 4 and keep.sum() == 3 + 1 + 2  # "a red square [SEP]", "blue [SEP]"
    assert loss.item() == pytest.approx(-(logp[keep]).mean().item(), rel=1e-5)


def test_vqa_trains_sparse_with_inherited_decoder_masks(tmp_path, tokenizer, pretrained):
    pl.seed_everything(0)
    module = XVLMVQAModule(backbone=pretrained.path, tokenizer=tokenizer, lr=1e-3, answer_list=ANSWERS, k_test=4,
                           output_dir=str(tmp_path / "out"))
    train, val = vqa_loaders(tokenizer)
    callback = fit_with_masks(module, pretrained, tmp_path, train, val)
    masks = assert_sparse(module, pretrained, callback)
    assert len(masks) == len(pretrained.result.masks) + 2 * 10  # the decoder copies 2 fusion layers
    dec = "backbone.text_decoder.layer.3.attention.self.value.weight"
    fusion = dec.replace("text_decoder", "fusion_encoder")
    params = dict(module.named_parameters())
    assert torch.equal(masks[dec], masks[fusion]) and not torch.equal(params[dec], params[fusion])
    results = json.loads((tmp_path / "out" / "val_vqa_predictions_epoch0.json").read_text())
    assert sorted(r["question_id"] for r in results) == list(range(12))
    by_id = {r["question_id"]: r["answer"] for r in results}
    items = vqa_items()
    expected = vqa_accuracy([by_id[qid] for _, qid, _, _ in items], [h for _, _, _, h in items])
    assert module.eval_results["val"]["vqa_acc"] == pytest.approx(expected)


def test_vqa_answers_start_with_cls_and_loss_weights_answers(tokenizer, pretrained):
    torch.manual_seed(0)
    module = XVLMVQAModule(backbone=pretrained.path, tokenizer=tokenizer, answer_list=ANSWERS, label_smoothing=0.0)
    module.eval()  # no dropout: the hand computation must see the same network
    module.log = lambda *a, **k: None
    b = next(iter(vqa_loaders(tokenizer, n_images=2, batch_size=2)[0]))
    loss = module.training_step(b, 0)
    q = module.encode_question(b["image"], b["question_input_ids"], b["question_attention_mask"])
    total, row = 0.0, 0
    for qi, n in enumerate(b["n_answers"].tolist()):
        for _ in range(n):
            ids, att = b["answer_input_ids"][row:row + 1], b["answer_attention_mask"][row:row + 1]
            assert ids[0, 0] == tokenizer.cls_token_id
            logits = module.backbone.decode(ids, att, q[qi:qi + 1], b["question_attention_mask"][qi:qi + 1]).float()
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0][att[:, 1:].bool()]
            total += -logp.sum().item() * b["answer_weights"][row].item()
            row += 1
    assert loss.item() == pytest.approx(total / 2, rel=1e-4)


def test_calibration_step_reaches_every_layer_and_snip_loss(tmp_path, tokenizer, pretrained):
    """Pruning the VQA module itself: every layer (decoder included) is calibrated; per group at target."""
    module = XVLMVQAModule(backbone=pretrained.path, tokenizer=tokenizer, answer_list=ANSWERS)
    calibration = [calibration_batch(tokenizer, n=4, seed=s) for s in (3, 4)]
    callback = mflightning.MultiFlowCallback(0.5, calibration=calibration)
    _, val = vqa_loaders(tokenizer, n_images=2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback])).validate(module, val)
    groups = callback.result.group_sparsity()
    assert set(groups) == {"vision", "text", "fusion"}
    assert all(v == pytest.approx(0.5, abs=0.005) for v in groups.values()), groups
    assert any(n.startswith("backbone.text_decoder.") for n in callback.result.masks)
    snip = mflightning.prune(module, sparsity=0.5, method="snip", calibration=calibration[:1],
                             loss=lambda m, batch: m.pruning_loss(batch))
    assert snip.sparsity == pytest.approx(0.5, abs=0.01)


def test_optimizer_groups_and_linear_warmup_schedule(tokenizer, pretrained):
    module = XVLMRetrievalModule(backbone=pretrained.path, tokenizer=tokenizer)
    module._trainer = SimpleNamespace(estimated_stepping_batches=50)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decay, no_decay = optimizer.param_groups
    assert optimizer.defaults["betas"] == (0.9, 0.98) and module.lr == 3e-5
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(module.named_parameters())
    assert id(named["backbone.temp"]) in no_decay_ids
    assert id(named["backbone.fusion_encoder.layer.2.output.LayerNorm.weight"]) in no_decay_ids
    assert id(named["backbone.vision_encoder.blocks.0.attn.qkv.bias"]) in no_decay_ids
    assert id(named["backbone.vision_encoder.blocks.0.attn.qkv.weight"]) not in no_decay_ids
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert set(named) - trainable == {n for n in named if n.startswith(("backbone.bbox_head.",
                                                                          "backbone.text_encoder.cls."))}
    factor = linear_warmup_lambda(50, 5)
    assert [factor(s) for s in (0, 4, 5, 30, 50)] == pytest.approx([0.2, 1.0, 1.0, 20 / 45, 0.0])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-5 * 0.2)  # warmup is 10% of 50 steps
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-5 * 0.4)


def test_backbone_spec_is_checked_against_the_tokenizer(tmp_path, tokenizer, pretrained):
    small = tiny_config(len(tokenizer) - 1).to_dict()
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but the backbone's vocabulary is"):
        XVLMRetrievalModule(backbone=small, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"\[PAD\] id 0 differs from the backbone's pad_token_id 1"):
        XVLMRetrievalModule(backbone={**tiny_config(len(tokenizer)).to_dict(), "pad_token_id": 1}, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        XVLMVQAModule(backbone=str(tmp_path / "nothing_here"), tokenizer=tokenizer, answer_list=ANSWERS)
    with pytest.raises(ValueError, match="backbone is required"):
        XVLMCaptioningModule(tokenizer=tokenizer)


def table_step(table, eos):
    """Next-token logits from a table prefix -> {token: probability}; unlisted prefixes end (eos)."""

    def step(seqs):
        out = torch.full((seqs.size(0), 4), -1e9)
        for row, seq in enumerate(seqs.tolist()):
            for token, p in table.get(tuple(seq[1:]), {eos: 1.0}).items():
                out[row, token] = math.log(p)
        return out

    return step


def test_beam_search_by_hand():
    """Beams keep a second-best start that greedy decoding drops; min/max length count the prompt."""
    eos, prompt = 3, torch.zeros(1, 1, dtype=torch.long)
    step = table_step({(): {1: 0.6, 2: 0.4}, (1,): {1: 0.25, 2: 0.4, eos: 0.35}, (2,): {1: 0.95, eos: 0.05}}, eos)
    # [2, 1, eos]: log(.38)/3 beats [1, 2, eos]: log(.24)/3; [1, eos] (.21) ranks 3rd of 4 at its step.
    assert beam_search(step, prompt, num_beams=2, min_length=1, max_length=6, eos_token_id=eos) == [[2, 1]]
    assert beam_search(step, prompt, num_beams=1, min_length=1, max_length=6, eos_token_id=eos) == [[1, 2]]
    # max_length 3 = prompt + 2 tokens: the running beams compete without eos.
    assert beam_search(step, prompt, 2, 1, 3, eos) == [[2, 1]]
    two = torch.zeros(2, 1, dtype=torch.long)
    step = table_step({(): {1: 1.0}, (1,): {eos: 0.6, 2: 0.4}}, eos)
    assert beam_search(step, two, 1, 1, 6, eos) == [[1], [1]]
    assert beam_search(step, two, 2, 3, 6, eos) == [[1, 2], [1, 2]]  # eos blocked while length < 3


def evaluate_retrieval(pretrained_path: str, workdir: str, devices: int) -> dict:
    """Validate XVLM retrieval on 5 images, one per batch (2 processes: the sampler repeats one)."""
    tokenizer = make_tokenizer(workdir)
    module = XVLMRetrievalModule(backbone=pretrained_path, tokenizer=tokenizer, k_test=4, itm_batch_size=3)
    loader = retrieval_loaders(tokenizer, n_images=5, eval_batch_size=1)[1]
    strategy = "ddp" if devices > 1 else "auto"
    pl.Trainer(**trainer_kwargs(workdir, devices=devices, strategy=strategy)).validate(module, loader)
    return module.eval_results["val"]


def test_two_process_retrieval_eval_equals_one_process(tmp_path, pretrained):
    """Each process re-ranks the images it owns; gathered ITM scores give the one-process metrics."""
    one = evaluate_retrieval(pretrained.path, str(tmp_path), devices=1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, pretrained.path, str(tmp_path / "two")], capture_output=True,
                          text=True, timeout=240, env=env, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(lines[0][len("RESULT:"):])
    assert two == pytest.approx(one)


if __name__ == "__main__":  # the two-process run (DDP re-executes this command per rank)
    os.makedirs(sys.argv[2], exist_ok=True)
    metrics = evaluate_retrieval(sys.argv[1], sys.argv[2], devices=2)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print("RESULT:" + json.dumps(metrics, sort_keys=True))
