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


def test_lockstep_gives_every_rank_the_same_number_of_forwards_and_counts_each_batch_once():
    from torch.utils.data import DataLoader

    from mflightning.pruning.stats import iterate_shard

    samples = [{"x": torch.tensor([float(i)])} for i in range(10)]
    for source in (list(range(5)), DataLoader(samples, batch_size=2)):  # plain iterable; rebuilt loader
        shares = [list(iterate_shard(source, None, (rank, 3), lockstep=True)) for rank in range(3)]
        assert [len(s) for s in shares] == [2, 2, 2], "5 batches over 3 ranks: every rank runs 2 forwards"
        counted = sorted(i for s in shares for i, _ in s if i is not None)
        assert counted == [0, 1, 2, 3, 4]
        assert [i for i, _ in shares[2]][-1] is None, "rank 2's second forward only keeps pace"
        without = [list(iterate_shard(source, None, (rank, 3))) for rank in range(3)]
        assert [len(s) for s in without] == [2, 2, 1]
