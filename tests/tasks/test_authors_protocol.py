"""Fine-tuning switches that reproduce the MultiFlow authors' code, pinned on tiny computations against
values computed by hand from their definitions (VQA ranking scores, the XVLM answer loss, ...)."""
import pytest
import torch
import torch.nn.functional as F

from task_fixtures import BLIP, BOTH, XVLM, calibration_batch, make_tokenizer, vqa_loaders
from mflightning.tasks.momentum import momentum_update_

MULTI_TOKEN_ANSWERS = ["red square", "blue", "a big circle", "no", "white stripe"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("vocab"))


def _token_logp(module, ids, att, q, q_mask):
    """Per-position log-softmax of the decoder ``(rows, L-1, V)`` predicting tokens 1.. of ``ids``."""
    logits = module.backbone.decode(ids, att, q.expand(len(ids), -1, -1), q_mask.expand(len(ids), -1)).float()
    return logits[:, :-1].log_softmax(-1)


@pytest.mark.parametrize("family", BOTH)
def test_vqa_rank_scores_by_hand(tokenizer, family):
    torch.manual_seed(0)
    module = family.module("vqa", tokenizer, k_test=3, label_smoothing=0.1, answer_list=MULTI_TOKEN_ANSWERS).eval()
    _, val = vqa_loaders(tokenizer, n_images=2, batch_size=2)
    for rank_score in ("log_likelihood", "smoothed_loss", "first_token_twice"):
        module.rank_score = rank_score
        module.candidate_suffix = "[SEP]" if rank_score == "first_token_twice" else ""
        module._answer_tokens = None  # re-tokenize the candidates with the suffix
        _check_rank_scores(module, tokenizer, val)


def _check_rank_scores(module, tokenizer, val):
    """log_likelihood: sum of log p; smoothed_loss (BLIP's): minus the label-smoothed CE summed over tokens,
    ((1 - e) * -log p_y + e * mean_v -log p_v) with e = 0.1; first_token_twice (XVLM's): log p(first) + sum log p,
    candidates "answer[SEP]"."""
    rank_score, suffix = module.rank_score, module.candidate_suffix
    e = next(iter(val))
    q = module.encode_question(e["image"], e["question_input_ids"], e["question_attention_mask"])
    q_mask = e["question_attention_mask"]
    topk, scores = module.answer_scores(q, q_mask)
    answer_ids, answer_mask = module._answers()
    if suffix:  # [CLS] answer [SEP] [SEP]: the last two real tokens of every candidate are [SEP]
        ends = [ids[m.bool()][-2:].tolist() for ids, m in zip(answer_ids, answer_mask)]
        assert ends == [[tokenizer.sep_token_id] * 2] * len(MULTI_TOKEN_ANSWERS)
    for qi in range(len(q)):
        start = answer_ids[:1, :1]
        first = _token_logp(module, torch.cat([start, start], 1), torch.ones(1, 2, dtype=torch.long),
                            q[qi:qi + 1], q_mask[qi:qi + 1])[0, 0].exp()[answer_ids[:, 1]]
        assert topk[qi].tolist() == first.topk(3).indices.tolist()
        for j, a in enumerate(topk[qi].tolist()):
            ids, att = answer_ids[a:a + 1], answer_mask[a:a + 1]
            logp = _token_logp(module, ids, att, q[qi:qi + 1], q_mask[qi:qi + 1])[0]
            real = att[0, 1:].bool()
            target = logp.gather(-1, ids[0, 1:, None])[:, 0][real]
            if rank_score == "smoothed_loss":
                expected = -(0.9 * -target + 0.1 * -logp[real].mean(-1)).sum()
            elif rank_score == "first_token_twice":
                expected = target.sum() + first[a].log()
            else:
                expected = target.sum()
            assert scores[qi, j].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    chosen = module.rank_answers(q, q_mask)
    assert chosen.tolist() == [topk[i, scores[i].argmax()].item() for i in range(len(q))]


def test_rank_score_is_checked(tokenizer):
    with pytest.raises(ValueError, match="rank_score"):
        BLIP.module("vqa", tokenizer, rank_score="sum")


def test_xvlm_vqa_answer_loss_has_no_label_smoothing(tokenizer):
    """The XVLM authors' answer decoder is built with label_smoothing=0.0; BLIP's keeps 0.1."""
    assert XVLM.module("vqa", tokenizer).label_smoothing == 0.0
    assert BLIP.module("vqa", tokenizer).label_smoothing == 0.1
    torch.manual_seed(0)
    module = XVLM.module("vqa", tokenizer).eval()
    module.log = lambda *a, **k: None
    train, _ = vqa_loaders(tokenizer, n_images=2, batch_size=2)
    b = next(iter(train))
    loss = module.training_step(b, 0)
    q = module.encode_question(b["image"], b["question_input_ids"], b["question_attention_mask"])
    q = q.repeat_interleave(b["n_answers"], 0)
    q_mask = b["question_attention_mask"].repeat_interleave(b["n_answers"], 0)
    ids, att = module.decoder_ids(b["answer_input_ids"]), b["answer_attention_mask"]
    logits = module.backbone.decode(ids, att, q, q_mask).float()[:, :-1]
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * att[:, 1:]
    assert loss.item() == pytest.approx((ce.sum(1) * b["answer_weights"]).sum().item() / 2, rel=1e-5)


def test_momentum_rules_on_two_tensors():
    """ema: p_m = 0.995 p_m + 0.005 p; swapped (the MultiFlow authors' BLIP retrieval): p_m = 0.995 p + 0.005 p_m."""
    source, target = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    for rule, expected in (("ema", [[2.99, 4.985]]), ("swapped", [[1.01, 2.015]])):
        with torch.no_grad():
            source.weight.copy_(torch.tensor([[1.0, 2.0]]))
            target.weight.copy_(torch.tensor([[3.0, 5.0]]))
        momentum_update_(target, source, 0.995, rule)
        torch.testing.assert_close(target.weight, torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="momentum rule"):
        momentum_update_(target, source, 0.995, "nesterov")


def test_retrieval_module_applies_the_swapped_momentum_rule(tokenizer):
    """A training step first moves the momentum encoders: with momentum_rule='swapped' to 0.995 p + 0.005 p_m."""
    torch.manual_seed(0)
    module = BLIP.module("retrieval", tokenizer, queue_size=0, alpha=0.0, momentum_rule="swapped")
    with torch.no_grad():  # online and momentum weights apart, so the two rules give different results
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in module.backbone_m.named_parameters()}
    online = dict(module.backbone.named_parameters())
    batch = calibration_batch(tokenizer, n=4)
    batch["image_idx"] = torch.arange(4)
    module.retrieval_losses(batch)
    assert len(before) > 20
    for name, p_m in module.backbone_m.named_parameters():
        expected = 0.995 * online[name].detach() + 0.005 * before[name]
        torch.testing.assert_close(p_m, expected, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="momentum_rule"):
        BLIP.module("retrieval", tokenizer, momentum_rule="swap")
    with pytest.raises(ValueError, match="itm_negatives"):
        XVLM.module("retrieval", tokenizer, itm_negatives="all")
    with pytest.raises(ValueError, match="gather_backward"):
        XVLM.module("retrieval", tokenizer, gather_backward="mean")


def test_blip_captioning_generated_normalisation_is_transformers_and_sequence_selectable(tokenizer):
    """BLIP generates with transformers 5's beam search; our beam search with the same ("generated")
    normalisation picks the same captions, so length_normalisation="sequence" (transformers 4.31's,
    run on our beam search) is the only change."""
    from mflightning.models.generation import beam_search

    torch.manual_seed(0)
    module = BLIP.module("captioning", tokenizer, max_generated_length=9, min_generated_length=5).eval()
    images = calibration_batch(tokenizer, n=3)["image"]
    bb = module.backbone
    embeds = bb.encode_image(images)
    prompt = module.decoder_ids(tokenizer([module.prompt] * 3, return_tensors="pt").input_ids[:, :-1])
    kwargs = dict(num_beams=3, min_length=5, max_length=9, eos_token_id=tokenizer.sep_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    beams = embeds.repeat_interleave(3, 0)

    def step(seqs):
        return bb.caption_logits(seqs, torch.ones_like(seqs), beams)[:, -1]

    ours = beam_search(step, prompt, 3, 5, 9, tokenizer.sep_token_id)
    hf = [[t for t in ids if t not in (tokenizer.sep_token_id, tokenizer.pad_token_id)]
          for ids in bb.generate_caption(prompt, embeds, **kwargs)]
    assert ours == hf
    module.length_normalisation = "sequence"
    assert module.generate(images) == [tokenizer.decode(ids, skip_special_tokens=True).strip()
                                       for ids in beam_search(step, prompt, 3, 5, 9, tokenizer.sep_token_id,
                                                              length_normalisation="sequence")]
    with pytest.raises(ValueError, match="length_normalisation"):
        BLIP.module("captioning", tokenizer, length_normalisation="tokens")
