"""Sharded calibration in one process: each simulated rank sees its own batches, and the reduction
(an in-place sum over ranks, faked here with the other rank's buffer) gives the statistics of all batches."""
import torch

from mflightning.pruning import collect_input_norms, find_targets, resolve_modalities
from toy_models import GROUPS, ToyVLM, make_batches


def forward(model, batch):
    model(batch["image"], batch["input_ids"], batch["attention_mask"])


def stats(model, batches, **kwargs):
    targets = find_targets(model, resolve_modalities(model, GROUPS, [r"head\."]))
    return collect_input_norms(model, targets, batches, forward=forward, **kwargs)


def flat(result):
    counts = torch.tensor([result.num_batches, result.num_samples, *result.calls.values()], dtype=torch.float64)
    return torch.cat([*(s.reshape(-1) for s in result.sums.values()), counts])


def test_two_shards_reduced_equal_one_process_on_all_batches():
    torch.manual_seed(0)
    model, batches = ToyVLM(), make_batches(5, seed=2)
    single = stats(model, batches)
    rank1 = stats(model, batches, shard=(1, 2))
    alone = stats(model, batches, shard=(0, 2))
    assert (alone.num_batches, rank1.num_batches) == (3, 2), "batch i goes to rank i % 2"
    reduced = stats(model, batches, shard=(0, 2), reduce=lambda t: t.add_(flat(rank1)))
    assert reduced.num_batches == single.num_batches == 5
    assert reduced.calls == single.calls
    for name in single.sums:
        assert torch.allclose(reduced.sums[name], single.sums[name], rtol=1e-12), name
        assert not torch.allclose(alone.sums[name], single.sums[name]), "one shard alone must differ"
