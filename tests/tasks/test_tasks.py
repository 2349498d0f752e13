"""Retrieval, captioning and VQA modules on both backbones: training, evaluation against hand checks,
results files, one mask file for every task, calibration."""
import json
import math

import lightning.pytorch as pl
import pytest
import torch

import mflightning
from task_fixtures import (ANSWERS, BLIP, BOTH, TINY_BACKBONE, XVLM_TINY_BACKBONE, caption_loaders, calibration_batch,
                           make_tokenizer, retrieval_loaders, trainer_kwargs, vqa_items, vqa_loaders)
from mflightning.metrics import retrieval_recall, vqa_accuracy
from mflightning.models import BlipBackbone, XVLMBackbone, with_first_token
from mflightning.models.xvlm import tiny_config as xvlm_tiny_config
from mflightning.tasks import CaptioningModule, RetrievalModule, VQAModule
from mflightning.tasks import XVLMRetrievalModule
from mflightning.tasks.ranking import recall_from_scores, rerank_scores, topk_score_matrices


def score_matrices(sims, itm, k, module=RetrievalModule):
    """The re-ranked matrices the module's own `combine_scores` gives (no instance needed: it reads no state)."""
    return topk_score_matrices(sims, module.combine_scores(None, itm, sims), k)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("vocab"))


def test_rerank_by_hand():
    sims = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])  # 2 images x 3 texts
    itm = torch.tensor([[0.0, 5.0, -1.0], [3.0, -2.0, 0.0]])
    calls = []

    def itm_score(i, texts):
        calls.append((i, texts.tolist()))
        return itm[i, texts]

    rows, cols, values = rerank_scores(sims, itm_score, k=1)
    # k=1: image 0 -> text 0, image 1 -> text 1; text 0 -> img 0, text 1 -> img 1, text 2 -> img 1.
    assert calls == [(0, [0]), (1, [1, 2])]
    dense = torch.full_like(sims, float("nan"))
    dense[rows, cols] = values
    s_i2t, s_t2i = score_matrices(sims, dense, k=1)
    inf = float("-inf")
    assert torch.allclose(s_i2t, torch.tensor([[0.9, inf, inf], [inf, -1.2, inf]]))
    assert torch.allclose(s_t2i, torch.tensor([[0.9, inf], [inf, -1.2], [inf, 0.7]]))
    s_i2t, s_t2i = score_matrices(sims, dense, k=1, module=XVLMRetrievalModule)  # XVLM: the ITM logit alone
    assert torch.allclose(s_i2t, torch.tensor([[0.0, inf, inf], [inf, -2.0, inf]]))
    assert torch.allclose(s_t2i, torch.tensor([[0.0, inf], [inf, -2.0], [inf, 0.0]]))
    # k=3 re-ranks everything: combined = [[0.9, 5.1, -0.5], [3.2, -1.2, 0.7]].
    rows, cols, values = rerank_scores(sims, lambda i, t: itm[i, t], k=3)
    dense[rows, cols] = values
    s_i2t, s_t2i = score_matrices(sims, dense, k=3)
    metrics = recall_from_scores(s_i2t, s_t2i, txt2img=[0, 1, 1], img2txt=[[0], [1, 2]])
    # image 0 ranks text 1 (5.1) above its own text 0; image 1 ranks text 0 (3.2) above text 2.
    assert metrics["txt_r1"] == 0.0 and metrics["txt_r5"] == 100.0
    # text 0 -> image 1 first (wrong), text 1 -> image 0 first (wrong), text 2 -> image 1 (right).
    assert metrics["img_r1"] == pytest.approx(100 / 3) and metrics["img_r5"] == 100.0
    assert metrics["r_mean"] == pytest.approx((0 + 100 + 100 + 100 / 3 + 100 + 100) / 6)


@pytest.mark.parametrize("family", BOTH)
def test_retrieval_trains_and_eval_matches_brute_force(tmp_path, tokenizer, family):
    pl.seed_everything(0)
    module = family.module("retrieval", tokenizer, lr=1e-3, k_test=3)
    train, val = retrieval_loaders(tokenizer)
    before = [p.detach().clone() for p in module.backbone.itm_head.parameters()]
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(module, train, val)
    assert not all(torch.equal(a, b) for a, b in zip(before, module.backbone.itm_head.parameters()))
    got = module.eval_results["val"]
    assert set(got) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean",
                        "r_mean"}

    # Brute force: every pair's ITM, the family's top-k combination filled in with plain loops.
    module.eval()
    bb = module.backbone
    with torch.no_grad():
        batches = list(val)
        img_embeds = torch.cat([bb.encode_image(b["image"]) for b in batches])
        ids = torch.cat([b["text_input_ids"] for b in batches])
        att = torch.cat([b["text_attention_mask"] for b in batches])
        sims = bb.image_features(img_embeds) @ bb.text_features(bb.encode_text(ids, att)).t()
        enc = with_first_token(ids, bb.enc_token_id)
        itm = torch.stack([bb.match_logits(enc, att, img.expand(len(ids), -1, -1))[:, 1] for img in img_embeds.split(1)])
    txt2img = torch.cat([b["text_image_idx"] for b in batches]).tolist()
    combined = family.rerank(itm, sims)
    s_i2t, s_t2i = torch.full_like(sims, -math.inf), torch.full_like(sims.t(), -math.inf)
    for i in range(sims.size(0)):
        for t in sims[i].topk(3).indices:
            s_i2t[i, t] = combined[i, t]
    for t in range(sims.size(1)):
        for i in sims[:, t].topk(3).indices:
            s_t2i[t, i] = combined[i, t]
    img2txt = [[t for t, i in enumerate(txt2img) if i == img] for img in range(sims.size(0))]
    expected_txt = retrieval_recall(s_i2t, txt2img, img2txt)
    expected_img = retrieval_recall(s_t2i.t().contiguous(), txt2img, img2txt)
    for k in (1, 5, 10):
        assert got[f"txt_r{k}"] == pytest.approx(expected_txt[f"txt_r{k}"])
        assert got[f"img_r{k}"] == pytest.approx(expected_img[f"img_r{k}"])


@pytest.mark.parametrize("family", BOTH)
def test_captioning_trains_generates_and_writes_coco_results(tmp_path, tokenizer, family):
    pl.seed_everything(0)
    module = family.module("captioning", tokenizer, lr=1e-3, output_dir=str(tmp_path / "out"),
                           max_generated_length=10)
    train, val = caption_loaders(tokenizer)
    pl.Trainer(**trainer_kwargs(tmp_path, precision="bf16-mixed")).fit(module, train, val)
    results = json.loads((tmp_path / "out" / "val_captions_epoch0.json").read_text())
    assert sorted(r["image_id"] for r in results) == list(range(100, 106))  # COCO integer ids, each once
    assert all(isinstance(r["caption"], str) and "picture" not in r["caption"] for r in results)
    lengths = [len(tokenizer(r["caption"], add_special_tokens=False).input_ids) for r in results]
    assert all(1 <= n <= 10 - module.prompt_length for n in lengths)  # min/max length count the prompt
    assert {"bleu1", "bleu4", "meteor", "rouge_l", "cider"} <= set(module.eval_results["val"])


@pytest.mark.parametrize("family", BOTH)
def test_caption_loss_leaves_out_prompt_and_padding(tokenizer, family):
    module = family.module("captioning", tokenizer, label_smoothing=0.0).eval()  # no dropout: same network twice
    module.log = lambda *a, **k: None
    b = calibration_batch(tokenizer, n=2)
    enc = tokenizer(["a picture of a red square", "a picture of blue"], padding="max_length", max_length=12,
                    return_tensors="pt")
    b.update(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    loss = module.training_step(b, 0)
    ids = with_first_token(enc.input_ids, module.dec_token_id)  # BLIP: [DEC]; XVLM: [CLS] as tokenized
    assert torch.equal(ids, module.decoder_ids(enc.input_ids))
    logits = module.backbone.caption_logits(ids, enc.attention_mask, module.backbone.encode_image(b["image"])).float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = enc.attention_mask[:, 1:].bool().clone()
    keep[:, : module.prompt_length - 1] = False  # "a picture of" is given, not predicted
    assert module.prompt_length == 4 and keep.sum() == 3 + 1 + 2  # "a red square [SEP]", "blue [SEP]"
    assert loss.item() == pytest.approx(-(logp[keep]).mean().item(), rel=1e-5)
    only_prompt = tokenizer(["a picture of"] * 2, padding="max_length", max_length=12, return_tensors="pt")
    b.update(input_ids=only_prompt.input_ids[:, :4], attention_mask=only_prompt.attention_mask[:, :4])
    with pytest.raises(ValueError, match="every label is ignored"):
        module.training_step(b, 0)


@pytest.mark.parametrize("family", BOTH)
def test_vqa_loss_weights_and_answer_ranking_by_hand(tokenizer, family):
    torch.manual_seed(0)
    module = family.module("vqa", tokenizer, k_test=4, label_smoothing=0.0).eval()
    module.log = lambda *a, **k: None
    train, val = vqa_loaders(tokenizer, n_images=2, batch_size=2)
    b = next(iter(train))
    loss = module.training_step(b, 0)
    q = module.encode_question(b["image"], b["question_input_ids"], b["question_attention_mask"])
    total, row = 0.0, 0
    for qi, n in enumerate(b["n_answers"].tolist()):
        for _ in range(n):
            ids = with_first_token(b["answer_input_ids"][row:row + 1], module.dec_token_id)
            att = b["answer_attention_mask"][row:row + 1]
            logits = module.backbone.decode(ids, att, q[qi:qi + 1], b["question_attention_mask"][qi:qi + 1]).float()
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0][att[:, 1:].bool()]
            total += -logp.sum().item() * b["answer_weights"][row].item()
            row += 1
    assert loss.item() == pytest.approx(total / 2, rel=1e-4)

    e = next(iter(val))
    with torch.no_grad():
        q = module.encode_question(e["image"], e["question_input_ids"], e["question_attention_mask"])
        chosen = module.rank_answers(q, e["question_attention_mask"])
        answer_ids, answer_mask = module._answers()
        assert (answer_ids[:, 0] == module.dec_token_id).all()  # BLIP: [DEC]; XVLM: [CLS]
        first = module.backbone.decode(answer_ids[:1, :1].expand(len(q), 1), torch.ones(len(q), 1, dtype=torch.long),
                                       q, e["question_attention_mask"])[:, 0].softmax(-1)[:, answer_ids[:, 1]]
        for qi in range(len(q)):
            best, best_ll = None, -math.inf
            for a in first[qi].topk(4).indices.tolist():
                ids, att = answer_ids[a:a + 1], answer_mask[a:a + 1]
                logits = module.backbone.decode(ids, att, q[qi:qi + 1], e["question_attention_mask"][qi:qi + 1])
                ll = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0][att[:, 1:].bool()].sum()
                if ll > best_ll:
                    best, best_ll = a, ll
            assert chosen[qi].item() == best


@pytest.mark.parametrize("family", BOTH)
def test_vqa_trains_and_writes_server_format(tmp_path, tokenizer, family):
    pl.seed_everything(0)
    answers_file = tmp_path / "answers.json"
    answers_file.write_text(json.dumps(ANSWERS))
    module = family.module("vqa", tokenizer, lr=1e-3, answer_list=str(answers_file), output_dir=str(tmp_path / "out"))
    train, val = vqa_loaders(tokenizer)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision="bf16-mixed"))
    trainer.fit(module, train, val)
    results = json.loads((tmp_path / "out" / "val_vqa_predictions_epoch0.json").read_text())
    assert sorted(r["question_id"] for r in results) == list(range(12))
    assert all(r["answer"] in ANSWERS for r in results)
    by_id = {r["question_id"]: r["answer"] for r in results}
    items = vqa_items()
    expected = vqa_accuracy([by_id[qid] for _, qid, _, _ in items], [h for _, _, _, h in items])
    assert module.eval_results["val"]["vqa_acc"] == pytest.approx(expected)
    # Without human answers (test-dev): predictions only, no accuracy.
    _, test = vqa_loaders(tokenizer, with_answers=False)
    trainer.test(module, test)
    assert (tmp_path / "out" / "test_vqa_predictions.json").is_file() and "test" not in module.eval_results


def pretrained_blip(tokenizer):
    """A tied tiny BLIP (pretraining layout); its untied decoder layer inherits 6 masks in every task."""
    tied = BlipBackbone.from_config(
        {**TINY_BACKBONE, "text_config": {**TINY_BACKBONE["text_config"], "vocab_size": len(tokenizer),
                                          "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 0,
                                          "sep_token_id": tokenizer.sep_token_id}},
        tie_decoder=True,
    )
    tied.config.enc_token_id = tokenizer.enc_token_id
    return tied, {"retrieval": 6, "captioning": 6, "vqa": 6}


def pretrained_xvlm(tokenizer):
    """A tiny XVLM with 2 text + 2 fusion layers; only VQA adds the decoder (2 fusion layers x 10 masks)."""
    backbone = XVLMBackbone(xvlm_tiny_config(len(tokenizer), num_text_layers=2, num_fusion_layers=2))
    return backbone, {"retrieval": 0, "captioning": 0, "vqa": 20}


class GradientCoverage(pl.Callback):
    """Trainable parameters left without a gradient (plain DDP would fail on them)."""

    def __init__(self):
        self.missing = set()

    def on_after_backward(self, trainer, pl_module):
        self.missing |= {n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("family", BOTH)
def test_one_mask_file_serves_all_three_tasks(tmp_path, tokenizer, family):
    """Prune once on the pretrained backbone, fine-tune every task with the same file: sparsity intact,
    every trainable parameter gets a gradient, copies of pruned layers inherit their masks."""
    torch.manual_seed(0)
    build = pretrained_blip if family is BLIP else pretrained_xvlm
    backbone, inherited = build(tokenizer)
    result = mflightning.prune(backbone, sparsity=0.6, calibration=[calibration_batch(tokenizer, n=4, seed=s) for s in (1, 2)])
    mask_file = result.save(tmp_path / "masks.safetensors")
    backbone.save_pretrained(tmp_path / "pretrained")

    loaders = {"retrieval": retrieval_loaders(tokenizer), "captioning": caption_loaders(tokenizer),
               "vqa": vqa_loaders(tokenizer)}
    for task, (train, _) in loaders.items():
        module = family.module(task, tokenizer, backbone=str(tmp_path / "pretrained"), lr=1e-2)
        callback, coverage = mflightning.MultiFlowCallback(masks=str(mask_file)), GradientCoverage()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback, coverage], limit_val_batches=0,
                                              precision="bf16-mixed"))
        trainer.fit(module, train)
        assert not coverage.missing, f"{task}: no gradient for {sorted(coverage.missing)[:5]}"
        masks = result.masks_for(module)
        params = dict(module.named_parameters())
        assert len(masks) == len(result.masks) + inherited[task], task
        for name, mask in masks.items():
            assert not params[name][~mask].any(), f"{task}: pruned weights of {name} moved"
            assert params[name][mask].ne(0).float().mean() > 0.99, name
        measured = callback.measured_sparsity(module)
        assert set(measured) == family.groups | {"total"}
        for group in family.groups:
            assert measured[group] == pytest.approx(result.sparsity, abs=0.02), (task, group)
    if family is BLIP:
        dec = "backbone.text_decoder.bert.encoder.layer.0.intermediate.dense.weight"
        enc = "backbone.text_encoder.encoder.layer.0.intermediate.dense.weight"
    else:
        dec = "backbone.text_decoder.layer.3.attention.self.value.weight"
        enc = dec.replace("text_decoder", "fusion_encoder")
    assert torch.equal(masks[dec], masks[enc])  # the last module (VQA) holds the decoder copy
    assert not torch.equal(params[dec], params[enc])  # untied copies trained separately


@pytest.mark.parametrize("family", BOTH)
def test_calibration_step_reaches_every_layer_and_snip_loss(tmp_path, tokenizer, family):
    """Pruning the VQA module itself: every layer (decoder included) is calibrated; per group at target."""
    module = family.module("vqa", tokenizer)
    calibration = [calibration_batch(tokenizer, n=4, seed=s) for s in (3, 4)]
    callback = mflightning.MultiFlowCallback(0.5, calibration=calibration)
    _, val = vqa_loaders(tokenizer, n_images=2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback])).validate(module, val)
    groups = callback.result.group_sparsity()
    assert set(groups) == family.groups
    assert all(v == pytest.approx(0.5, abs=0.005) for v in groups.values()), groups
    assert any(n.startswith("backbone.text_decoder.") for n in callback.result.masks)
    losses = module.pretraining_losses(calibration[0])
    assert set(losses) == ({"itc", "itm", "lm"} if family is BLIP else {"itc", "itm", "mlm", "caption_lm", "lm"})
    snip = mflightning.prune(module, sparsity=0.5, method="snip", calibration=calibration[:1],
                             loss=lambda m, batch: m.pruning_loss(batch))
    assert snip.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("family", BOTH)
def test_backbone_spec_errors_name_the_problem(tmp_path, tokenizer, family):
    if family is BLIP:
        small = {**TINY_BACKBONE, "text_config": {**TINY_BACKBONE["text_config"], "vocab_size": len(tokenizer) - 1}}
    else:
        small = {**family.config, "vocab_size": len(tokenizer) - 1}
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but the backbone's vocabulary is"):
        family.module("retrieval", tokenizer, backbone=small)
    with pytest.raises(ValueError, match="backbone is required"):
        family.tasks["captioning"](tokenizer=tokenizer)
    with pytest.raises(TypeError, match="backbone must be"):
        family.module("retrieval", tokenizer, backbone=3)
    with pytest.raises(TypeError, match=r"does not implement VisionLanguageBackbone: it lacks \['pruning_preset'"):
        family.module("retrieval", tokenizer, backbone=torch.nn.Linear(2, 2))


def test_the_modules_take_any_backbone_of_the_interface(tokenizer):
    """The BLIP-default RetrievalModule around an XVLM instance: XVLM's preset, first tokens and unused parts."""
    torch.manual_seed(0)
    backbone = XVLMBackbone(xvlm_tiny_config(len(tokenizer)))
    module = RetrievalModule(backbone=backbone, tokenizer=tokenizer)
    assert module.backbone is backbone and module.pruning_preset == "xvlm"
    assert module.enc_token_id == module.dec_token_id == tokenizer.cls_token_id
    assert module.unused_parts == backbone.unused_parts("retrieval")
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if n.startswith("bbox_head."))
    module.log_dict = lambda *a, **k: None
    batch = next(iter(retrieval_loaders(tokenizer)[0]))
    assert torch.isfinite(module.training_step(batch, 0))
    blip = CaptioningModule(backbone=TINY_BACKBONE, tokenizer=tokenizer)
    assert blip.pruning_preset == "blip" and blip.dec_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    with pytest.raises(ValueError, match="unknown BLIP config keys"):  # a dict is read by backbone_type (BLIP)
        VQAModule(backbone=XVLM_TINY_BACKBONE, tokenizer=tokenizer, answer_list=ANSWERS)
