"""transformers' CLIP, SigLIP, BLIP-2 and LLaVA: recognised presets, calibration adapters, PAD filtering.

Tiny random configurations built by hand (no downloads); batches shaped like the processors' output:
`pixel_values (B,3,32,32)`, `input_ids (B,L)` with padding (id 0, mask 0) and, for BLIP-2 / LLaVA, the
image placeholder tokens in `input_ids` with mask 1, as Blip2Processor / LlavaProcessor write them.
"""
import re

import lightning as L
import pytest
import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Model,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    SiglipConfig,
    SiglipModel,
)

from mflightning import MultiFlowCallback, PruningResult, prune
from mflightning.pruning import CalibrationError, collect_input_norms, find_targets, resolve_modalities
from mflightning.pruning.presets import calibration_adapter, recognise_preset

# BLIP-2 with OPT warns about OPT's flattened fc1/fc2 inputs (test_blip2_with_opt_warns_... checks it)
pytestmark = pytest.mark.filterwarnings("ignore:BLIP-2 with OPT")

B, TEXT = 3, 7
IMAGE = 32  # 4x4 patches of 8 px + CLS: 17 vision tokens
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
              patch_size=8)
TEXT_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
BLIP2_IMAGE_TOKEN, QUERIES = 110, 4
LLAVA_IMAGE_TOKEN, PATCHES = 99, 16  # LLaVA drops CLS ("default" strategy): 16 image tokens per image


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Linear weights (and BLIP-2's query tokens) drawn at random: some are initialised to zero, which no
    pruning can rank (zero query tokens give the Q-Former all-zero inputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)
        if hasattr(model, "query_tokens"):
            model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=generator))
    return model.eval()


def clip_model():
    torch.manual_seed(0)
    return _randomise(CLIPModel(CLIPConfig(text_config=TEXT_CFG, vision_config=VISION, projection_dim=16)))


def siglip_model():
    torch.manual_seed(0)
    return _randomise(SiglipModel(SiglipConfig(text_config=TEXT_CFG, vision_config=VISION)))


def blip2_config():
    opt = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=120,
                    max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   encoder_hidden_size=32, vocab_size=100)
    return Blip2Config(vision_config=VISION, qformer_config=qformer, text_config=opt.to_dict(),
                       num_query_tokens=QUERIES, image_token_index=BLIP2_IMAGE_TOKEN)


def blip2_model(cls=Blip2ForConditionalGeneration):
    torch.manual_seed(0)
    return _randomise(cls(blip2_config()))


def llava_model(vision_feature_layer=-2):
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT_CFG, num_key_value_heads=2),
        image_token_index=LLAVA_IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
    )
    return _randomise(LlavaForConditionalGeneration(config))


def make_batch(seed=0, image_token=None, image_tokens=0, text=TEXT, with_mask=True):
    """A processor-like batch: samples 0 and 1 end in padding (mask 0; id 2, the EOS token, as LLaMA tokenizers
    pad: the pad_token_id 0 row of an embedding is zero, which would hide a missing filter); image tokens first, mask 1."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (B, text), generator=generator)
    mask = torch.ones(B, text, dtype=torch.long)
    mask[0, text - 2:] = 0
    mask[1, text - 1:] = 0
    ids[mask == 0] = 2
    if image_token is not None:
        ids = torch.cat([torch.full((B, image_tokens), image_token), ids], 1)
        mask = torch.cat([torch.ones(B, image_tokens, dtype=torch.long), mask], 1)
    batch = {"pixel_values": torch.randn(B, 3, IMAGE, IMAGE, generator=generator), "input_ids": ids}
    if with_mask:
        batch["attention_mask"] = mask
    return batch


FAMILIES = {
    # name: (builder, batch kwargs, {group: regex on names}, dense layers (regex), expected preset)
    "clip": (clip_model, {}, {"vision": r"^vision_model\.encoder\.", "text": r"^text_model\.encoder\."},
             [r"^visual_projection\.weight$", r"^text_projection\.weight$"]),
    "siglip": (siglip_model, {}, {"vision": r"^vision_model\.encoder\.", "text": r"^text_model\.encoder\."},
               [r"^text_model\.head\.weight$", r"^vision_model\.head\.(attention\.(in_proj_weight|out_proj\.weight)"
                r"|mlp\.fc[12]\.weight)$"]),
    "blip2": (blip2_model, dict(image_token=BLIP2_IMAGE_TOKEN, image_tokens=QUERIES),
              {"vision": r"^vision_model\.encoder\.", "qformer": r"^qformer\.encoder\.",
               "language": r"^language_model\.model\.decoder\.layers\."},
              [r"^language_projection\.weight$"]),  # OPT's LM head is tied to the embeddings: an embedding
    "llava": (llava_model, dict(image_token=LLAVA_IMAGE_TOKEN, image_tokens=PATCHES),
              {"vision": r"^model\.vision_tower\.encoder\.layers\.0\.", "projector": r"^model\.multi_modal_projector\.",
               "language": r"^model\.language_model\.layers\."},
              [r"^lm_head\.weight$", r"^model\.vision_tower\.encoder\.layers\.1\."]),  # layer 1: after vision_feature_layer
}


def _differs(a, b, rtol=1e-4):
    """Not equal up to `rtol` (relative only: some families' inits make whole statistics tiny)."""
    return not torch.allclose(a, b, rtol=rtol, atol=0)


def batches(name, n=2, **overrides):
    kwargs = {**FAMILIES[name][1], **overrides}
    return [make_batch(seed=i, **kwargs) for i in range(n)]


def stats(model, data, preset=None):
    """The engine's per-layer sums of squared inputs with the preset's adapter, and its targets."""
    preset = preset or recognise_preset(model)
    targets = find_targets(model, resolve_modalities(model, preset))
    adapter = calibration_adapter(model, preset)
    result = collect_input_norms(model, targets, data, forward=adapter.forward, token_mask=adapter.token_mask)
    return result, targets


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_recognised_fully_reached_grouped_and_keeps_heads_dense(family):
    build, _, groups, dense = FAMILIES[family]
    model = build()
    data = batches(family)
    assert recognise_preset(model) == family
    result = prune(model, sparsity=0.5, calibration=data)  # modalities=None, no forward: the adapter runs it
    assert result.preset == family
    # every layer is in the group its module says, and only layers a group claims are masked
    for name, group in result.groups.items():
        assert re.search(groups[group], name), (name, group)
    assert set(result.groups.values()) == set(groups)
    # the heads (and LLaVA's unused vision layer) stay dense and are reported as such
    assert result.dense_layers and all(any(re.search(p, n) for p in dense) for n in result.dense_layers)
    assert all(any(re.search(p, n) for n in result.dense_layers) for p in dense)
    # embeddings, patch convolutions, query tokens, logit scale: never masked
    masked = set(result.masks)
    assert not [n for n in masked if re.search(r"embed|query_tokens|logit_|patch|lm_head", n)]
    params = dict(model.named_parameters())
    every_linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = {n for n in every_linear if params.get(n) is None}  # a tied LM head is named as the embedding
    assert masked | set(result.dense_layers) | tied | _mha_names(model) >= every_linear
    # every prunable layer is reached by the adapter's forward
    seen, targets = stats(model, data)
    assert set(targets) == masked and all(count >= len(data) for count in seen.calls.values())
    # pruning happened in every group
    for group in groups:
        names = [n for n, g in result.groups.items() if g == group]
        kept = sum(int(result.masks[n].sum()) for n in names)
        assert kept < sum(result.masks[n].numel() for n in names), group


def _mha_names(model):
    return {f"{n}.out_proj.weight" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def test_blip2_model_without_lm_head_class_is_recognised_too():
    model = blip2_model(Blip2Model)
    result = prune(model, sparsity=0.5, calibration=batches("blip2"))
    assert result.preset == "blip2" and set(result.groups.values()) == {"vision", "qformer", "language"}
    assert "language_projection.weight" in result.dense_layers


class Holder(nn.Module):
    """A wrapper holding the transformers model as `self.model` (as a LightningModule would) plus a buffer."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner


@pytest.mark.parametrize("family", ["clip", "llava"])
def test_a_wrapped_model_is_recognised_and_gets_the_same_masks_under_its_prefix(family):
    bare = FAMILIES[family][0]()
    wrapped = Holder(FAMILIES[family][0]())
    data = batches(family)
    want = prune(bare, sparsity=0.6, calibration=data)
    got = prune(wrapped, sparsity=0.6, calibration=data)
    assert got.preset == family
    assert set(got.masks) == {f"model.{n}" for n in want.masks}
    assert all(torch.equal(got.masks[f"model.{n}"], m) for n, m in want.masks.items())
    assert set(got.dense_layers) == {f"model.{n}" for n in want.dense_layers}
    # masks of the bare model apply to the wrapper: the coverage check knows the wrapper's unused layers too
    resolved = want.apply(wrapped)
    assert set(resolved) == set(got.masks)


def test_llava_keeps_the_vision_layers_after_vision_feature_layer_dense():
    for layer, dense in ((-1, set()), (-2, {1}), (1, {1}), ([0, -1], set())):
        model = llava_model(layer)
        result = prune(model, sparsity=0.5, calibration=batches("llava", n=1))
        unused = {int(m.group(1)) for n in result.dense_layers if (m := re.search(r"vision_tower\.encoder\.layers\.(\d+)\.", n))}
        assert unused == dense, layer
        assert {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n, g in result.groups.items() if g == "vision"} \
            == {0, 1} - dense


def _captured_inputs(module: nn.Module, forward, batch):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            forward(None, batch)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


CHECKS = {
    # family: (layer read by image tokens only / all tokens, first LM / text layer, its token positions)
    "clip": ("vision_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
    "siglip": ("vision_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
    "blip2": ("qformer.encoder.layer.0.crossattention.attention.key", "language_model.model.decoder.layers.0.self_attn.q_proj"),
    "llava": ("model.multi_modal_projector.linear_1", "model.language_model.layers.0.self_attn.q_proj"),
}


@pytest.mark.parametrize("family", sorted(CHECKS))
def test_statistics_count_real_tokens_and_image_tokens_exactly(family):
    """Text/LM layers: the sum over positions with mask 1 (image placeholders included); image layers: all tokens.

    CLIP's text length equals its vision token count (17), so a vision layer filtered by the text mask
    would be caught; BLIP-2's and LLaVA's LM sequences carry the image tokens at mask 1.
    """
    model = FAMILIES[family][0]()
    text = 17 if family in ("clip", "siglip") else TEXT
    batch = batches(family, n=1, text=text)[0]
    image_layer, text_layer = CHECKS[family]
    got, targets = stats(model, [batch])
    adapter = calibration_adapter(model, family)
    modules = dict(model.named_modules())
    x = _captured_inputs(modules[image_layer], adapter.forward, batch)
    assert not targets[f"{image_layer}.weight"].filter_tokens
    close = dict(rtol=1e-5, atol=0)  # the engine squares in fp32, this reference in fp64
    torch.testing.assert_close(got.sums[f"{image_layer}.weight"], x.reshape(-1, x.shape[-1]).square().sum(0), **close)
    x = _captured_inputs(modules[text_layer], adapter.forward, batch)
    real = batch["attention_mask"].bool()
    assert x.shape[:2] == real.shape and not real.all()
    torch.testing.assert_close(got.sums[f"{text_layer}.weight"], x[real].square().sum(0), **close)
    assert _differs(got.sums[f"{text_layer}.weight"], x.reshape(-1, x.shape[-1]).square().sum(0), rtol=1e-3)
    if family in ("blip2", "llava"):  # the image positions count: leaving them out gives another sum
        text_only = real & (batch["input_ids"] != FAMILIES[family][1]["image_token"])
        assert _differs(got.sums[f"{text_layer}.weight"], x[text_only].square().sum(0), rtol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_content_changes_nothing_and_image_content_changes_the_text_side(family):
    model = FAMILIES[family][0]()
    data = batches(family)
    base, targets = stats(model, data)
    text_layers = [n for n, t in targets.items() if t.filter_tokens]
    image_layers = [n for n, t in targets.items() if not t.filter_tokens]
    assert text_layers and image_layers
    padded = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 57)) for b in data]
    assert all(not torch.equal(p["input_ids"], b["input_ids"]) for p, b in zip(padded, data))
    after, _ = stats(model, padded)
    for name in targets:  # OPT's flattened fc1/fc2 included
        torch.testing.assert_close(after.sums[name], base.sums[name], rtol=1e-6, atol=0, msg=name)
    # a real text token does change the text layers (the test above can fail)
    changed = [dict(b, input_ids=b["input_ids"].clone()) for b in data]
    for b in changed:
        b["input_ids"][2, -1] = 5 if b["input_ids"][2, -1] != 5 else 6
    after, _ = stats(model, changed)
    first = [n for n in text_layers if re.search(r"layers?\.0\.self_attn", n)]
    assert first and all(_differs(after.sums[n], base.sums[n]) for n in first)
    # another image: every image layer changes and, where the LM reads image tokens, so does its first layer
    other = [dict(b, pixel_values=b["pixel_values"].flip(-1)) for b in data]
    after, _ = stats(model, other)
    vision = [n for n in image_layers if targets[n].group == "vision"]
    assert vision and all(_differs(after.sums[n], base.sums[n]) for n in vision)
    # the other image groups (BLIP-2's Q-Former, LLaVA's projector) read the image too, except the
    # Q-Former's first self-attention and cross-attention query, whose inputs are the learned query tokens alone
    query_only = r"qformer\.encoder\.layer\.0\.(attention\.|crossattention\.attention\.query\.)"
    others = [n for n in image_layers if n not in vision and not re.search(query_only, n)]
    assert all(_differs(after.sums[n], base.sums[n]) for n in others)
    if family in ("blip2", "llava"):
        first = CHECKS[family][1] + ".weight"  # position-wise input: only the image positions can change it
        assert _differs(after.sums[first], base.sums[first])
    else:  # two towers: the text side never sees the image
        assert all(torch.equal(after.sums[n], base.sums[n]) for n in text_layers)


OPT_FLATTENED = r"language_model\.model\.decoder\.layers\.\d+\.fc[12]\."


def test_opt_fc_layers_ignore_padding():
    """OPT feeds fc1/fc2 (B*L, D): the padded rows are dropped there too (they were counted before)."""
    model = blip2_model()
    data = batches("blip2")
    base, _ = stats(model, data)
    after, _ = stats(model, [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 57)) for b in data])
    names = [name for name in base.sums if re.search(OPT_FLATTENED, name)]
    assert len(names) == 4  # fc1, fc2 of both OPT layers: a rename in transformers must not make this vacuous
    for name in names:
        torch.testing.assert_close(after.sums[name], base.sums[name], rtol=1e-6, atol=0, msg=name)


def test_siglip_batches_without_attention_mask_count_every_position():
    model = siglip_model()
    batch = batches("siglip", n=1, with_mask=False)[0]
    got, targets = stats(model, [batch])
    layer = CHECKS["siglip"][1]
    x = _captured_inputs(dict(model.named_modules())[layer], calibration_adapter(model, "siglip").forward, batch)
    torch.testing.assert_close(got.sums[f"{layer}.weight"], x.reshape(-1, x.shape[-1]).square().sum(0), rtol=1e-5, atol=0)
    assert prune(model, sparsity=0.5, calibration=[batch]).preset == "siglip"


def test_the_adapters_refuse_batches_they_cannot_run_naming_the_problem():
    model = blip2_model()
    no_images = batches("blip2", n=1, image_token=None)  # input_ids without the query placeholders
    with pytest.raises(CalibrationError, match=r"num_query_tokens=4 image tokens \(id 110\).*\[0, 0, 0\]"):
        prune(model, sparsity=0.5, calibration=no_images)
    missing = [{k: v for k, v in batches("blip2", n=1)[0].items() if k != "pixel_values"}]
    with pytest.raises(CalibrationError, match=r"missing \['pixel_values'\]"):
        prune(model, sparsity=0.5, calibration=missing)
    bad_mask = [dict(batches("clip", n=1)[0], attention_mask=torch.ones(B, 3, dtype=torch.long))]
    with pytest.raises(CalibrationError, match=r"attention_mask \(3, 3\) and input_ids \(3, 7\) differ"):
        prune(clip_model(), sparsity=0.5, calibration=bad_mask)
    model.config.image_token_index = None
    with pytest.raises(CalibrationError, match="image_token_index is None"):
        prune(model, sparsity=0.5, calibration=batches("blip2", n=1))


def test_extra_batch_keys_are_not_passed_and_a_user_forward_wins():
    model = clip_model()
    data = [dict(b, image_idx=torch.arange(B), labels=torch.zeros(B)) for b in batches("clip")]
    plain = prune(model, sparsity=0.5, calibration=batches("clip"))
    extra = prune(model, sparsity=0.5, calibration=data)
    assert all(torch.equal(plain.masks[n], extra.masks[n]) for n in plain.masks)
    calls = []
    prune(model, sparsity=0.5, calibration=batches("clip"),
          forward=lambda m, b: calls.append(1) or m(b["input_ids"], b["pixel_values"], b["attention_mask"]))
    assert len(calls) == 2


def test_two_families_in_one_model_are_an_error_naming_both():
    both = nn.ModuleDict({"teacher": clip_model(), "student": siglip_model()})
    with pytest.raises(ValueError, match=r"several families .*teacher\. \(CLIPModel\).*student\. \(SiglipModel\)"):
        prune(both, sparsity=0.5, calibration=batches("clip"))
    # two copies of one family: both are run and masked
    twins = nn.ModuleDict({"teacher": clip_model(), "student": clip_model()})
    result = prune(twins, sparsity=0.5, calibration=batches("clip"))
    assert {n.split(".")[0] for n in result.masks} == {"teacher", "student"}


def test_plain_torch_models_keep_one_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert recognise_preset(model) is None
    assert set(prune(model, sparsity=0.5, method="omp").groups.values()) == {"all"}


class ContrastiveCLIP(L.LightningModule):
    """A fine-tuning module wrapping CLIP: symmetric InfoNCE over the batch, no forward of its own."""

    def __init__(self):
        super().__init__()
        self.clip = clip_model().train()

    def training_step(self, batch, batch_idx):
        out = self.clip(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"], return_loss=True)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def test_masks_survive_fine_tuning_with_the_callback(tmp_path):
    """The callback runs the recognised family's adapter when the module has no calibration_step."""
    module = ContrastiveCLIP()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = MultiFlowCallback(0.6, calibration=batches("clip", n=2),
                                 save_masks=str(tmp_path / "masks.safetensors"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(module, torch.utils.data.DataLoader(batches("clip", n=4), batch_size=None))
    saved = PruningResult.load(tmp_path / "masks.safetensors")
    assert saved.preset == "clip" and set(saved.groups.values()) == {"vision", "text"}
    params = dict(module.named_parameters())
    assert callback.kept_masks and all(n.startswith("clip.") for n in callback.kept_masks)
    for name, kept in callback.kept_masks.items():
        assert (params[name].detach()[~kept] == 0).all(), name
        assert not kept.all()
    moved = [n for n, k in callback.kept_masks.items() if not torch.equal(params[n][k], before[n][k])]
    assert moved  # training did update the kept weights
    assert torch.equal(params["clip.visual_projection.weight"] != 0, before["clip.visual_projection.weight"] != 0)
    # the saved file applies to a bare CLIPModel (prefix stripped, its heads dense on purpose)
    bare = clip_model()
    applied = saved.apply(bare)
    assert set(applied) == {n[len("clip."):] for n in callback.kept_masks}


def test_a_given_forward_runs_a_model_the_preset_adapter_could_not():
    """modalities="clip" on a look-alike (no transformers CLIPModel inside) with the user's forward= works:
    the adapter is built only when no forward is given (it used to be built, and refuse the model)."""
    model = nn.ModuleDict({"vision_model": nn.Sequential(nn.Linear(4, 4)),
                           "text_model": nn.Sequential(nn.Linear(4, 4))})

    def forward(m, batch):
        return m["vision_model"](batch["pixels"]).sum() + m["text_model"](batch["tokens"]).sum()

    data = [{"pixels": torch.randn(2, 3, 4), "tokens": torch.randn(2, 5, 4), "attention_mask": torch.ones(2, 5)}]
    result = prune(model, sparsity=0.5, modalities="clip", calibration=data, forward=forward)
    assert set(result.groups.values()) == {"vision", "text"}
    with pytest.raises(ValueError, match="CLIPModel"):  # without a forward the adapter is asked, and says why not
        prune(model, sparsity=0.5, modalities="clip", calibration=data)


class TuneLlava(L.LightningModule):
    """The README's LLaVA example: the model under `self.model`, a language-modelling loss, no calibration_step."""

    def __init__(self):
        super().__init__()
        self.model = llava_model().train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch, labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_the_readme_llava_example_fine_tunes_with_calibration_batches_and_its_own_train_loader(tmp_path):
    """ProcessorDataModule serves evaluation and calibration only: the example passes calibration= and a train loader."""
    callback = MultiFlowCallback(0.5, calibration=batches("llava", n=2))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    module = TuneLlava()
    trainer.fit(module, torch.utils.data.DataLoader(batches("llava", n=2), batch_size=None))
    params = dict(module.named_parameters())
    assert callback.kept_masks and "model.lm_head.weight" not in callback.kept_masks
    for name, kept in callback.kept_masks.items():
        assert (params[name].detach()[~kept] == 0).all(), name
    assert callback.result.preset == "llava" and set(callback.result.groups.values()) == {"vision", "projector", "language"}
