"""RetrievalModule's momentum encoders, feature queue, momentum distillation and switches, on one process."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from task_fixtures import BLIP, XVLM, calibration_batch, make_tokenizer
from mflightning.models.interface import with_first_token
from mflightning.tasks.momentum import FeatureQueue, ema_copy, momentum_update_, ramped_alpha

OFF = dict(momentum=None, queue_size=0, alpha=0.0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("vocab"))


def train_batch(tokenizer, seed=0):
    batch = calibration_batch(tokenizer, n=4, seed=seed)
    batch["image_idx"] = torch.tensor([7, 8, 7, 9])  # captions 0 and 2 describe one image
    return batch


def reference_losses(backbone, batch):
    """ITC + ITM as the module computed them before momentum, queue and gathering existed."""
    image_embeds = backbone.encode_image(batch["image"])
    ids, att, idx = batch["input_ids"], batch["attention_mask"], batch["image_idx"]
    text_states = backbone.encode_text(ids, att)
    image_feat, text_feat = backbone.image_features(image_embeds), backbone.text_features(text_states)
    with torch.no_grad():
        backbone.temp.clamp_(0.001, 0.5)
    sim = image_feat.float() @ text_feat.float().t() / backbone.temp.float()
    positives = (idx.view(-1, 1) == idx.view(1, -1)).float()
    t_i2t = positives / positives.sum(1, keepdim=True).clamp_min(1)
    t_t2i = positives.t() / positives.t().sum(1, keepdim=True).clamp_min(1)
    itc = (-(F.log_softmax(sim, 1) * t_i2t).sum(1).mean() - (F.log_softmax(sim.t(), 1) * t_t2i).sum(1).mean()) / 2
    enc = with_first_token(ids, backbone.enc_token_id)
    with torch.no_grad():
        same = idx.view(-1, 1) == idx.view(1, -1)
        w_t2i = (F.softmax(sim.t().detach(), 1) + 1e-5).masked_fill(same, 0)
        txt_rows = torch.nonzero(w_t2i.sum(1) > 0).flatten()
        neg_image = torch.multinomial(w_t2i[txt_rows], 1).flatten()
        w_i2t = (F.softmax(sim.detach(), 1) + 1e-5).masked_fill(same, 0)
        img_rows = torch.nonzero(w_i2t.sum(1) > 0).flatten()
        neg_text = torch.multinomial(w_i2t[img_rows], 1).flatten()
    logits = backbone.match_logits(torch.cat([enc, enc[txt_rows], enc[neg_text]]),
                                   torch.cat([att, att[txt_rows], att[neg_text]]),
                                   torch.cat([image_embeds, image_embeds[neg_image], image_embeds[img_rows]]),
                                   text_states=torch.cat([text_states, text_states[txt_rows], text_states[neg_text]]))
    labels = torch.zeros(logits.size(0), dtype=torch.long)
    labels[: ids.size(0)] = 1
    return itc, F.cross_entropy(logits, labels)


@pytest.mark.parametrize("family,settings", [(BLIP, OFF), (BLIP, {**OFF, "gather": False}), (XVLM, {})],
                         ids=["blip-off", "blip-off-nogather", "xvlm-defaults"])
def test_switched_off_it_is_the_former_in_batch_itc_itm(tokenizer, family, settings):
    module = family.module("retrieval", tokenizer, **settings).eval()
    assert module.backbone_m is None and module.queue is None and "pruning_copies" not in vars(module)
    assert not any(k.startswith(("backbone_m.", "queue.")) for k in module.state_dict())
    batch = train_batch(tokenizer)
    torch.manual_seed(5)
    itc, itm = module.retrieval_losses(batch, alpha=0.0)
    torch.manual_seed(5)
    ref_itc, ref_itm = reference_losses(module.backbone, batch)
    assert torch.equal(itc, ref_itc) and torch.equal(itm, ref_itm)


def test_blip_defaults_follow_the_authors(tokenizer):
    module = BLIP.module("retrieval", tokenizer)
    assert (module.momentum, module.queue.size, module.alpha, module.gather) == (0.995, 57600, 0.4, True)
    assert module.pruning_copies == {"backbone_m.": "backbone."}
    parts = {n.split(".")[1] for n in module.state_dict() if n.startswith("backbone_m.")}
    assert parts == {"vision_model", "text_encoder", "vision_proj", "text_proj"}  # no decoder, no ITM head
    assert all(not p.requires_grad for p in module.backbone_m.parameters())
    for name, p in module.backbone_m.named_parameters():  # initialised from the backbone
        assert torch.equal(p, module.backbone.get_parameter(name)), name


def test_bad_switch_combinations_are_errors(tokenizer):
    with pytest.raises(ValueError, match="momentum=None"):
        BLIP.module("retrieval", tokenizer, momentum=None)  # alpha 0.4 would need a teacher
    with pytest.raises(ValueError, match="queue_size"):
        BLIP.module("retrieval", tokenizer, queue_size=-1)
    with pytest.raises(ValueError, match="momentum must be"):
        BLIP.module("retrieval", tokenizer, momentum=1.0)


def test_momentum_update_is_the_ema_formula_and_keeps_zeros():
    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    target = ema_copy(source, ["0"])  # only part "0" is copied
    assert [n for n, _ in target.named_parameters()] == ["0.weight", "0.bias"]
    with torch.no_grad():
        source[0].weight.mul_(2.0)
        source[0].weight[0, 0] = 0.0
        target[0].weight[0, 0] = 0.0
    before = target[0].weight.detach().clone()
    momentum_update_(target, source, 0.9)
    torch.testing.assert_close(target[0].weight, 0.9 * before + 0.1 * source[0].weight, rtol=0, atol=1e-7)
    assert target[0].weight[0, 0].item() == 0.0


def test_training_step_updates_the_momentum_encoders_before_using_them(tokenizer):
    module = BLIP.module("retrieval", tokenizer, queue_size=8).eval()
    with torch.no_grad():
        for p in module.backbone_m.parameters():
            p.add_(0.01)
    before = {n: p.detach().clone() for n, p in module.backbone_m.named_parameters()}
    module.retrieval_losses(train_batch(tokenizer), alpha=0.4)
    for name, p in module.backbone_m.named_parameters():
        expected = 0.995 * before[name] + 0.005 * module.backbone.get_parameter(name)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)


def test_alpha_ramps_over_the_first_epoch():
    assert [ramped_alpha(0.4, 0, b, 10) for b in (0, 5, 10, 12)] == [0.0, 0.2, 0.4, 0.4]
    assert ramped_alpha(0.4, 1, 0, 10) == 0.4 and ramped_alpha(0.4, 0, 3, float("inf")) == 0.4


def test_queue_wraps_around():
    queue = FeatureQueue(5, 2)
    assert queue.image_feat.shape == (0, 2)  # nothing enqueued: nothing read
    rows = lambda a, b: torch.arange(a, b, dtype=torch.float).view(-1, 1).expand(-1, 2)  # noqa: E731
    queue.enqueue(rows(0, 3), -rows(0, 3), torch.arange(0, 3))
    assert queue.image_idx.tolist() == [0, 1, 2] and int(queue.ptr) == 3
    queue.enqueue(rows(3, 6), -rows(3, 6), torch.arange(3, 6))
    assert queue.image_idx.tolist() == [5, 1, 2, 3, 4] and int(queue.ptr) == 1 and int(queue.filled) == 5
    assert queue.image_feat[:, 0].tolist() == [5, 1, 2, 3, 4] and queue.text_feat[:, 0].tolist() == [-5, -1, -2, -3, -4]
    queue.enqueue(rows(6, 13), -rows(6, 13), torch.arange(6, 13))  # longer than the queue: its last 5 rows
    assert sorted(queue.image_idx.tolist()) == [8, 9, 10, 11, 12] and int(queue.ptr) == 3
    assert queue.image_idx.tolist() == [10, 11, 12, 8, 9]


def test_itc_positives_by_image_id_include_the_queue_and_distillation_mixes_momentum_similarities(tokenizer):
    module = BLIP.module("retrieval", tokenizer, queue_size=6).eval()
    q_img, q_txt = F.normalize(torch.randn(3, 16), dim=-1), F.normalize(torch.randn(3, 16), dim=-1)
    module.queue.enqueue(q_img, q_txt, torch.tensor([8, 1, 7]))  # two queue rows share batch images 8 and 7
    batch = train_batch(tokenizer)
    for alpha in (0.0, 0.3):
        queue = {k: v.clone() for k, v in module.queue.state_dict().items()}
        itc, _ = module.retrieval_losses(batch, alpha=alpha)
        bb, m = module.backbone, module.backbone_m  # momentum already updated: the features it used
        with torch.no_grad():
            img = bb.image_features(bb.encode_image(batch["image"]))
            txt = bb.text_features(bb.encode_text(batch["input_ids"], batch["attention_mask"]))
            img_m = m.image_features(m.encode_image(batch["image"]))
            txt_m = m.text_features(m.encode_text(batch["input_ids"], batch["attention_mask"]))
        filled = int(queue["filled"])
        keys_img = torch.cat([img_m, queue["image_queue"][:filled]])
        keys_txt = torch.cat([txt_m, queue["text_queue"][:filled]])
        ids = torch.cat([batch["image_idx"], queue["idx_queue"][:filled]])
        positives = torch.zeros(4, len(ids))
        for r in range(4):
            for c in range(len(ids)):
                positives[r, c] = float(batch["image_idx"][r] == ids[c])
        positives /= positives.sum(1, keepdim=True)
        if filled == 3:  # queue ids 8, 1, 7: caption 0 (image 7) has 3 positives, one in the queue
            third = pytest.approx(1 / 3)
            assert positives[0].tolist() == [third, 0, third, 0, 0, 0, third]
            assert positives[1].tolist() == [0, 0.5, 0, 0, 0.5, 0, 0]  # image 8: queue row 0
        temp = bb.temp
        t_i2t = alpha * F.softmax(img_m @ keys_txt.t() / temp, 1) + (1 - alpha) * positives
        t_t2i = alpha * F.softmax(txt_m @ keys_img.t() / temp, 1) + (1 - alpha) * positives
        expected = (-(F.log_softmax(img @ keys_txt.t() / temp, 1) * t_i2t).sum(1).mean()
                    - (F.log_softmax(txt @ keys_img.t() / temp, 1) * t_t2i).sum(1).mean()) / 2
        torch.testing.assert_close(itc, expected, rtol=1e-5, atol=1e-6)
    # after two steps the queue holds the 3 rows given plus 4 momentum rows, then wraps: 6 slots filled
    assert int(module.queue.filled) == 6


def test_a_checkpoint_without_momentum_or_queue_still_loads(tokenizer):
    old = BLIP.module("retrieval", tokenizer, **OFF)
    new = BLIP.module("retrieval", tokenizer, queue_size=4)
    checkpoint = {"state_dict": dict(old.state_dict())}
    new.on_load_checkpoint(checkpoint)
    new.load_state_dict(checkpoint["state_dict"])
    for name, p in new.backbone_m.named_parameters():
        assert torch.equal(p, old.backbone.get_parameter(name)), name
    assert int(new.queue.filled) == 0


def test_a_momentum_trained_checkpoint_loads_into_a_module_without_momentum(tokenizer):
    trained = BLIP.module("retrieval", tokenizer, queue_size=4)
    plain = BLIP.module("retrieval", tokenizer, **OFF)
    checkpoint = {"state_dict": dict(trained.state_dict())}
    plain.on_load_checkpoint(checkpoint)
    plain.load_state_dict(checkpoint["state_dict"])  # strict: nothing extra, nothing missing
    for name, p in plain.backbone.named_parameters():
        assert torch.equal(p, trained.backbone.get_parameter(name)), name


def test_xvlm_can_switch_the_momentum_encoders_and_queue_on(tokenizer):
    module = XVLM.module("retrieval", tokenizer, momentum=0.995, queue_size=4, alpha=0.4).eval()
    parts = {n.split(".")[1] for n in module.state_dict() if n.startswith("backbone_m.")}
    assert parts == {"vision_encoder", "text_encoder", "vision_proj", "text_proj"}
    itc, itm = module.retrieval_losses(train_batch(tokenizer), alpha=0.4)
    assert torch.isfinite(itc) and torch.isfinite(itm) and int(module.queue.filled) == 4


def test_the_momentum_update_refuses_parameters_it_cannot_pair():
    """A momentum copy whose names no longer match the online model (re-parametrised) must not freeze silently."""
    from torch import nn

    from mflightning.tasks.momentum import momentum_update_

    online, copy_ = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    momentum_update_(copy_, online, 0.5)  # same names: fine
    renamed = nn.ModuleDict({"proj": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"2 momentum parameters have no online parameter .*proj\.weight"):
        momentum_update_(renamed, online, 0.5)


def test_true_half_precision_momentum_encoders_are_warned_about(tokenizer):
    module = BLIP.module("retrieval", tokenizer, queue_size=4)
    module.backbone_m.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="momentum encoders are held in torch.bfloat16"):
        module.on_train_start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BLIP.module("retrieval", tokenizer, queue_size=4).on_train_start()  # fp32: silent
