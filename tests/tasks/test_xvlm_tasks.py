"""What only the XVLM modules do: the authors' optimiser and schedule, checkpoint/tokenizer checks,
ITM-only re-ranking. The behaviour both backbones share is tested in test_tasks.py."""
from types import SimpleNamespace

import pytest
import torch

from task_fixtures import ANSWERS, BLIP, BOTH, XVLM, make_tokenizer
from mflightning.models.xvlm import XVLMBackbone, tiny_config
from mflightning.tasks import RetrievalModule, XVLMRetrievalModule, XVLMTaskModule, XVLMVQAModule
from mflightning.tasks.optim import cosine_lambda, linear_warmup_lambda


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("vocab"))


def optimizer_of(module, steps: int = 50):
    module._trainer = SimpleNamespace(estimated_stepping_batches=steps)
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def test_optimizer_groups_and_linear_warmup_schedule(tokenizer):
    module = XVLM.module("retrieval", tokenizer)
    optimizer, scheduler = optimizer_of(module)
    decay, no_decay = optimizer.param_groups
    assert optimizer.defaults["betas"] == (0.9, 0.98) and module.lr == 3e-5
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(module.named_parameters())
    assert id(named["backbone.temp"]) in no_decay_ids
    assert id(named["backbone.fusion_encoder.layer.1.output.LayerNorm.weight"]) in no_decay_ids
    assert id(named["backbone.vision_encoder.encoder.layers.0.self_attn.q_proj.bias"]) in no_decay_ids
    assert id(named["backbone.vision_encoder.encoder.layers.0.layer_norm1.weight"]) in no_decay_ids
    assert id(named["backbone.vision_encoder.encoder.layers.0.self_attn.q_proj.weight"]) not in no_decay_ids
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


@pytest.mark.parametrize("family", BOTH)
def test_each_family_has_its_authors_defaults_and_both_are_settings(tokenizer, family):
    """BLIP: one decayed group, cosine; XVLM: no-decay group, linear 10% warmup. Either is constructor settings."""
    defaults = {"retrieval": (1e-5, 3e-5), "captioning": (1e-5, 1e-5), "vqa": (2e-5, 5e-5)}
    for task, lrs in defaults.items():
        module = family.module(task, tokenizer)
        assert module.lr == lrs[family is XVLM], task
        assert (module.schedule, module.betas) == (("cosine", (0.9, 0.999)) if family is BLIP else
                                                   ("linear", (0.9, 0.98)))
    optimizer, _ = optimizer_of(family.module("retrieval", tokenizer))
    assert len(optimizer.param_groups) == (1 if family is BLIP else 2)
    # The generic module with XVLM's settings schedules like the XVLM one, and the other way round.
    swapped = dict(schedule="linear", warmup_ratio=0.1, betas=(0.9, 0.98), weight_decay=0.01, no_decay_bias_norm=True) \
        if family is BLIP else dict(schedule="cosine", warmup_ratio=0.0, warmup_steps=5, min_lr=1e-6, lr=1e-5)
    optimizer, scheduler = optimizer_of(family.module("retrieval", tokenizer, **swapped))
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    if family is BLIP:
        expected = [1e-5 * linear_warmup_lambda(50, 5)(s) for s in range(50)]
    else:
        expected = [1e-5 * cosine_lambda(50, 5, 0.1)(s) for s in range(50)]
    assert lrs == pytest.approx(expected)


def test_schedule_settings_are_checked(tokenizer):
    with pytest.raises(ValueError, match=r"give warmup_steps \(10\) or warmup_ratio \(0.1\), not both"):
        XVLM.module("retrieval", tokenizer, warmup_steps=10)
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\), got 1.0"):
        XVLM.module("retrieval", tokenizer, warmup_ratio=1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        BLIP.module("retrieval", tokenizer, schedule="step")


def test_xvlm_backbone_spec_is_checked_against_the_tokenizer(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"\[PAD\] id 0 differs from the backbone's pad_token_id 1"):
        XVLMRetrievalModule(backbone={**tiny_config(len(tokenizer)).to_dict(), "pad_token_id": 1}, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        XVLMVQAModule(backbone=str(tmp_path / "nothing_here"), tokenizer=tokenizer, answer_list=ANSWERS)
    with pytest.raises(ValueError, match="decoder_from is a BLIP option"):
        XVLM.module("vqa", tokenizer, decoder_from="Salesforce/blip-image-captioning-base")


def test_xvlm_retrieval_reranks_by_itm_alone_and_the_holder_has_no_task(tokenizer):
    itm, sims = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    assert torch.equal(XVLM.module("retrieval", tokenizer).combine_scores(itm, sims), itm)
    generic = RetrievalModule(backbone=XVLMBackbone(tiny_config(len(tokenizer))), tokenizer=tokenizer)
    assert torch.equal(generic.combine_scores(itm, sims), itm + sims)  # the re-ranking is the module's choice
    holder = XVLMTaskModule(backbone=XVLM.config, tokenizer=tokenizer)
    assert holder.unused_parts == () and all(p.requires_grad for p in holder.parameters())
    assert holder.pruning_preset == "xvlm" and holder.lr == 3e-5


def test_vqa_decoder_is_dense_unless_it_inherits_the_fusion_masks(tokenizer):
    """The authors' vqa.py without --inherit_mask loads masks of ones into every text_decoder layer (the copied
    pretrained fusion weights train dense); with it, the decoder takes the fusion layers' masks."""
    import copy

    import mflightning
    from task_fixtures import calibration_batch

    torch.manual_seed(0)
    backbone = XVLMBackbone(tiny_config(len(tokenizer), num_text_layers=1, num_fusion_layers=2))
    result = mflightning.prune(backbone, sparsity=0.6, calibration=[calibration_batch(tokenizer, n=4, seed=1)])
    dec, fus = "backbone.text_decoder.layer.2.crossattention.self.query.weight", "backbone.fusion_encoder.layer.2.crossattention.self.query.weight"
    for inherit in (True, False):
        module = XVLMVQAModule(backbone=copy.deepcopy(backbone), tokenizer=tokenizer, answer_list=ANSWERS,
                               inherit_decoder_masks=inherit)
        params = dict(module.named_parameters())
        before = params[dec].detach().clone()
        masks = result.apply(module)  # what MultiFlowCallback(masks=file) does at fit start
        assert not params[fus][~masks[fus]].any()
        if inherit:
            assert torch.equal(masks[dec], masks[fus]) and not params[dec][~masks[dec]].any()
        else:
            assert not any(".text_decoder." in n for n in masks) and torch.equal(params[dec], before)
            assert before.ne(0).all()  # the dense pretrained fusion weights, as copied
            # calibrating the module itself leaves the decoder out too (an unpruned copy: the one above is 60%
            # zeros, whose tied zero scores are refused as degenerate)
            fresh = XVLMVQAModule(backbone=copy.deepcopy(backbone), tokenizer=tokenizer, answer_list=ANSWERS,
                                  inherit_decoder_masks=False)
            own = mflightning.prune(fresh, sparsity=0.5, calibration=[calibration_batch(tokenizer, n=4, seed=2)],
                                    forward=lambda m, batch: m.calibration_step(batch))
            assert own.masks and not any(".text_decoder." in n for n in own.masks)
    with pytest.raises(ValueError, match="inherit_decoder_masks=False needs the 'xvlm' preset"):
        XVLMVQAModule(backbone=BLIP.module("retrieval", tokenizer).backbone, tokenizer=tokenizer, answer_list=ANSWERS,
                      inherit_decoder_masks=False)


def test_captioning_pretraining_stage_hands_its_sparse_backbone_to_the_captioning_stage(tmp_path, tokenizer):
    """recipes/xvlm/captioning_pretrain.yaml: LM without prompt or label smoothing under the masks, the backbone
    saved at the end (SaveBackbone), which the captioning module loads (their --load_capt_pretrain)."""
    import lightning.pytorch as pl

    import mflightning
    from task_fixtures import calibration_batch, caption_loaders, trainer_kwargs
    from mflightning.tasks import XVLMCaptioningModule
    from mflightning.tasks.save_backbone import SaveBackbone

    torch.manual_seed(0)
    backbone = XVLMBackbone(tiny_config(len(tokenizer), num_text_layers=1, num_fusion_layers=1))
    result = mflightning.prune(backbone, sparsity=0.5, calibration=[calibration_batch(tokenizer, n=4, seed=1)])
    masks = result.save(tmp_path / "masks.safetensors")
    backbone.save_pretrained(tmp_path / "pretrained")
    stage1 = XVLMCaptioningModule(backbone=str(tmp_path / "pretrained"), tokenizer=tokenizer, prompt="",
                                  label_smoothing=0.0, lr=1e-2, meteor=False)
    assert stage1.prompt_length == 1  # only [CLS] out of the loss: every caption token is predicted
    before = {n: p.detach().clone() for n, p in stage1.backbone.named_parameters()}
    train, _ = caption_loaders(tokenizer, prompt="")
    out = tmp_path / "capt_pretrain"
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mflightning.MultiFlowCallback(masks=str(masks)),
                                                     SaveBackbone(str(out))])).fit(stage1, train)
    stage2 = XVLMCaptioningModule(backbone={"checkpoint": str(out), "image_size": 48}, tokenizer=tokenizer,
                                  meteor=False)
    trained, loaded = dict(stage1.backbone.named_parameters()), dict(stage2.backbone.named_parameters())
    name = "fusion_encoder.layer.1.crossattention.self.query.weight"
    assert torch.equal(loaded[name], trained[name]) and not torch.equal(loaded[name], before[name])
    kept = result.masks[name]
    assert not loaded[name][~kept].any() and loaded[name][kept].ne(0).all()  # sparse as the mask file says
    assert stage2.backbone.image_size == 48
