"""ShuffledSampler determinism/resume and BatchIterator's data-parallel micro-batch layout."""

import numpy as np
import pytest
import torch

from moetrain.data.batches import BatchIterator, micro_batch_slices
from moetrain.data.dataset import WindowDataset
from moetrain.data.sampler import ShuffledSampler


def draw(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_deterministic_per_seed_and_different_across_seeds():
    assert draw(ShuffledSampler(50, 3), 120) == draw(ShuffledSampler(50, 3), 120)
    assert draw(ShuffledSampler(50, 3), 50) != draw(ShuffledSampler(50, 4), 50)


def test_each_epoch_covers_every_item_once():
    s = ShuffledSampler(37, 0)
    epochs = [draw(s, 37) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(37))
    assert epochs[0] != epochs[1]
    assert s.state_dict() == {"epoch": 3, "index": 0}
    assert epochs[1] == s.permutation(1).tolist()


def test_take_matches_iteration_across_epochs():
    a, b = ShuffledSampler(10, 1), ShuffledSampler(10, 1)
    assert a.take(25).tolist() == draw(b, 25)
    assert a.state_dict() == b.state_dict() == {"epoch": 2, "index": 5}


def test_state_dict_round_trip_resumes_exactly():
    s = ShuffledSampler(23, 7)
    draw(s, 40)
    state = s.state_dict()
    expected = draw(s, 60)
    resumed = ShuffledSampler(23, 7)
    resumed.load_state_dict(dict(state))
    assert draw(resumed, 60) == expected
    with pytest.raises(ValueError, match="does not fit"):
        resumed.load_state_dict({"epoch": 0, "index": 24})
    with pytest.raises(ValueError, match="epoch"):
        resumed.load_state_dict({"index": 1})


def make_iter(num_windows=64, seed=0, micro=2, rank=0, dp=1):
    ds = WindowDataset(np.arange(num_windows * 4 + 1), 4)
    return BatchIterator(ds, ShuffledSampler(len(ds), seed), micro, dp_rank=rank, dp_size=dp)


def test_micro_batch_slices_layout():
    assert micro_batch_slices(8, 2, 1, 2) == [slice(2, 4), slice(6, 8)]
    with pytest.raises(ValueError, match=r"train\.global_batch_size.*= 6"):
        micro_batch_slices(8, 3, 0, 2)


@pytest.mark.parametrize(("micro", "dp"), [(2, 2), (1, 4), (2, 1), (1, 2)])
def test_dp_ranks_union_equals_single_process(micro, dp):
    G, steps = 8, 5
    single = make_iter(micro=micro)
    ranks = [make_iter(micro=micro, rank=r, dp=dp) for r in range(dp)]
    for _ in range(steps):
        ref = single.next_global_batch(G)  # G // micro micro-batches, in processing order
        per_rank = [it.next_global_batch(G) for it in ranks]
        assert all(len(mb) == G // (micro * dp) for mb in per_rank)
        for r in range(dp):
            for j, (x, y) in enumerate(per_rank[r]):
                rx, ry = ref[j * dp + r]
                assert torch.equal(x, rx) and torch.equal(y, ry)
        assert len({it.state_dict()["index"] for it in [single, *ranks]}) == 1


def test_batch_iterator_shapes_and_resume():
    it = make_iter(micro=3)
    x, y = next(it)
    assert x.shape == y.shape == (3, 4) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    it.next_global_batch(6)
    state = it.state_dict()
    expected = [it.next_global_batch(6) for _ in range(30)]  # crosses epochs
    resumed = make_iter(micro=3)
    resumed.load_state_dict(state)
    got = [resumed.next_global_batch(6) for _ in range(30)]
    for a, b in zip(expected, got):
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
