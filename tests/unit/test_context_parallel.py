"""Context parallelism without processes: the blockwise (online-softmax) attention of every
simulated cp rank against full causal attention, the load-balanced chunk arithmetic, the MoE
token order, and the configuration checks (one line each)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, validate
from moetrain.parallel import ring_attention
from moetrain.parallel.cp import MoEContextParallel
from moetrain.parallel.dims import LayoutError
from moetrain.parallel.ring_attention import (
    blockwise_backward,
    blockwise_forward,
    chunk_ids,
    local_positions,
    owner,
)
from moetrain.train.cli import compose_config


def simulated_ring(q, k, v, do, cp: int, scale: float):
    """Every cp rank's forward and backward on its chunks, the key/value gradients summed over
    the ranks as the all-reduce does; returns (o, dq, dk, dv) in sequence order."""
    S = q.shape[2]
    c = S // (2 * cp)
    k_all, v_all = list(k.split(c, dim=2)), list(v.split(c, dim=2))
    o, dq = torch.empty_like(do), torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for rank in range(cp):
        pos = local_positions(S, rank, cp)
        ids = chunk_ids(rank, cp)
        q_r = q[:, :, pos]
        o_r, lse = blockwise_forward(list(q_r.split(c, dim=2)), ids, k_all, v_all, scale)
        grads = blockwise_backward(do[:, :, pos], q_r, o_r, lse, ids, k_all, v_all, scale)
        dq_r, dk_r, dv_r = grads
        o[:, :, pos], dq[:, :, pos] = o_r, dq_r
        dk += torch.cat(dk_r, dim=2)
        dv += torch.cat(dv_r, dim=2)
    return o, dq, dk, dv


@pytest.mark.parametrize("tile_scores", [None, 40])  # 40: row tiles of 1 to 3 rows
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (6, 2), (5, 1)])
def test_blockwise_attention_equals_causal_attention(cp, heads, kv_heads, tile_scores, monkeypatch):
    if tile_scores is not None:
        monkeypatch.setattr(ring_attention, "TILE_SCORES", tile_scores)
    torch.manual_seed(cp * 10 + heads)
    B, S, dk, dv = 2, 8 * cp, 8, 6  # value head dim unlike the q/k one (MLA)
    q = torch.randn(B, heads, S, dk, requires_grad=True)
    k = torch.randn(B, kv_heads, S, dk, requires_grad=True)
    v = torch.randn(B, kv_heads, S, dv, requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
    do = torch.randn_like(ref)
    ref.backward(do)
    o, dq, dk_, dv_ = simulated_ring(q.detach(), k.detach(), v.detach(), do, cp, dk**-0.5)
    for got, want in ((o, ref), (dq, q.grad), (dk_, k.grad), (dv_, v.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_chunks_are_load_balanced_and_cover_the_sequence():
    cp, S = 4, 32
    assert [chunk_ids(r, cp) for r in range(cp)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert all(
        owner(j, cp) == (r, slot) for r in range(cp) for slot, j in enumerate(chunk_ids(r, cp))
    )
    held = torch.cat([local_positions(S, r, cp) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(S))
    # causal work per rank: query chunk j sees j + 1 key chunks -> 2 x cp + 1 blocks everywhere
    assert {sum(j + 1 for j in chunk_ids(r, cp)) for r in range(cp)} == {2 * cp + 1}


def test_moe_tokens_of_the_cp_tp_group_are_the_whole_sequence():
    """Under cp x tp each group rank dispatches the tokens of its cp chunks' tp slice: all group
    ranks together hold every position once, and local_tokens indexes the flattened batch."""
    cp, tp, S, B = 2, 2, 16, 2
    ranks = [MoEContextParallel(None, cp, c, tp, t) for c in range(cp) for t in range(tp)]
    held = [m.held(S, m.rank, torch.device("cpu")) for m in ranks]
    assert sorted(torch.cat(held).tolist()) == list(range(S))
    # cp rank 0 holds chunks 0 and 3 (positions 0-3, 12-15); sequence parallelism gives tp rank
    # 1 the second half of that
    assert held[1].tolist() == [12, 13, 14, 15]
    idx = ranks[1].local_tokens(B, S, torch.device("cpu"))
    assert idx.tolist() == [12, 13, 14, 15, 28, 29, 30, 31]
    assert ranks[0].aux_grad_scale == 1 / 4


def config(world: int, monkeypatch, *overrides: str) -> Config:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = OmegaConf.to_object(compose_config(list(overrides)))
    assert isinstance(cfg, Config)
    return cfg


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (2, ["parallel.cp=2", "train.seq_len=90"], "train.seq_len: 90 is not divisible by 2 x"),
        (4, ["parallel.cp=2", "parallel.tp=2", "train.seq_len=36"], "divisible by 2 x parallel"),
        (2, ["parallel.cp=2", "data.document_mask=true"], "data.document_mask: context"),
        (2, ["parallel.cp=2", "model.moe.router_type=hash"], "model.moe.router_type: 'hash'"),
        (2, ["parallel.cp=2", "model.sliding_window=16"], "parallel.cp: context parallelism"),
        (2, ["parallel.cp=2", "parallel.expert_sharding=fssdp"], "parallel.cp=2; set parallel"),
        (4, ["parallel.cp=2", "parallel.tp=2", "parallel.etp=2"], "parallel.etp: expert tensor"),
        (3, ["parallel.cp=2"], "launch a multiple of 2 processes"),
        (2, ["parallel.cp=2", "train.compile=true"], "train.compile: is not supported with"),
    ],
)
def test_cp_config_errors_are_one_line(world, overrides, message, monkeypatch):
    cfg = config(world, monkeypatch, *overrides)
    with pytest.raises((ConfigError, LayoutError)) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cp_layouts_validate(monkeypatch):
    for world, overrides in [
        (2, ["parallel.cp=2"]),
        (4, ["parallel.cp=2", "parallel.ep=2"]),
        (4, ["parallel.cp=2", "parallel.tp=2"]),
        (4, ["parallel.cp=2", "parallel.pp=2"]),
        (2, ["parallel.cp=2", "model.moe.capacity_factor=1.0"]),  # exact over the cp group
    ]:
        validate(config(world, monkeypatch, *overrides))


def test_attention_refuses_a_mask_under_cp():
    from moetrain.models.attention import attend

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"^parallel\.cp: context parallelism runs full causal"):
        attend(object(), q, q, q, sliding_window=2)


def test_checkpoints_from_before_cp_keep_their_layout():
    from moetrain.parallel.dims import ParallelDims
    from moetrain.train.checkpointing import is_same_layout

    now = ParallelDims(world_size=2, ep=2).layout()
    old = {k: v for k, v in now.items() if k != "cp"}  # written before the cp axis existed
    assert is_same_layout(old, now) and is_same_layout(now, now)
    assert not is_same_layout({**old, "cp": 2}, now) and not is_same_layout(None, now)
