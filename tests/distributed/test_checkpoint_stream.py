"""Sharded checkpoint reads: each rank reads its share of a hub checkpoint (and of a native one)
and gets exactly the single-process values; checksum verification is split over the ranks and
its verdict is the same on every rank."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moetrain.checkpoint.hf import arch_of, save_hf
from moetrain.checkpoint.native import save_model
from moetrain.models import ModelConfig, Transformer
from moetrain.moe.config import MoEConfig
from moetrain.testing import run_distributed


def tiny_cfg() -> ModelConfig:
    # an odd vocabulary: uneven shards; a dense first layer: the dense MLP's tensors too
    moe = MoEConfig(num_experts=4, top_k=2, dim=32, hidden_dim=24)
    return ModelConfig(
        vocab_size=75, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, dense_hidden_dim=40,
        max_seq_len=32, first_k_dense=1, moe=moe,
    )  # fmt: skip


def placements(name: str, ndim: int, scheme: str) -> list[Any]:
    """Per parameter, placements on a 2 x 2 mesh. ``fsdp_tp_ep``: what the layouts make (experts
    on E then D, input projections FSDP over TP as _StridedShard, the rest on both dims, 1-D
    tensors replicated then sharded). ``strided``: shards that are not one run of indices."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if scheme == "strided" and ndim == 2:
        return [_StridedShard(0, split_factor=2), Replicate()]  # rank 0: rows 0-1, 4-5, ...
    if ndim == 3:
        return [Shard(0), Shard(2)]
    if ndim == 1:
        return [Replicate(), Shard(0)]
    if any(k in name for k in ("wq", "wk", "wv", "w1", "w3")):
        return [_StridedShard(0, split_factor=2), Shard(0)]
    return [Shard(1), Shard(0)]


def sharded_model(cfg: ModelConfig, mesh, scheme: str) -> nn.Module:
    """A model of ``cfg`` whose parameters are zero DTensors placed by ``scheme``."""
    from torch.distributed.tensor import distribute_tensor

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    for name, p in list(model.named_parameters()):
        full = torch.zeros(p.shape)
        sharded = distribute_tensor(
            full, mesh, placements(name, p.dim(), scheme), src_data_rank=None
        )
        owner, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), leaf, nn.Parameter(sharded, requires_grad=False))
    return model


def mismatches(module: nn.Module, want: dict[str, torch.Tensor], mesh) -> list[str]:
    """Names whose local shard is not the matching shard of the full tensor in ``want``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    bad = []
    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, DTensor):
            expect = distribute_tensor(want[name], mesh, t.placements, src_data_rank=None)
            ok = torch.equal(t.to_local(), expect.to_local())
        else:
            ok = torch.equal(t, want[name])
        if not ok:
            bad.append(name)
    return bad


def local_bytes(module: nn.Module) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in module.parameters())


def sharded_reads_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from moetrain.checkpoint import bytes_read, native
    from moetrain.checkpoint.hf import load_hf, load_hf_weights

    cfg, hub, mesh = tiny_cfg(), Path(root) / "hf", init_device_mesh("cpu", (2, 2))
    want = load_hf(hub).state_dict()  # the single-process values
    out: dict[str, Any] = {}
    for scheme in ("fsdp_tp_ep", "strided"):
        module = sharded_model(cfg, mesh, scheme)
        before = bytes_read()
        load_hf_weights(hub, module, cfg)
        out[scheme] = {
            "read": bytes_read() - before,
            "share": local_bytes(module),
            "bad": mismatches(module, want, mesh),
        }
    # a native checkpoint saved at this layout reads back its own chunks only
    module = sharded_model(cfg, mesh, "fsdp_tp_ep")
    load_hf_weights(hub, module, cfg)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    ckpt = native.save(Path(root) / "native", 1, module, optimizer, {"step": 1}, keep_last=0)
    fresh = sharded_model(cfg, mesh, "fsdp_tp_ep")
    before = bytes_read()
    native.load_model_weights(ckpt, fresh)
    out["native"] = {
        "read": bytes_read() - before,
        "share": local_bytes(fresh),
        "bad": mismatches(fresh, want, mesh),
    }
    return out


def header_bytes(root: Path) -> int:
    return sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in root.glob("*.safetensors"))


@pytest.mark.timeout(300)
def test_each_rank_reads_its_share_and_gets_the_single_process_values(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    save_hf(model, tmp_path / "hf", arch_of(model.cfg), max_shard_bytes=20_000)
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2  # a sharded hub directory with an index
    total = sum(f.stat().st_size for f in files)
    headers = header_bytes(tmp_path / "hf")
    results = run_distributed(sharded_reads_rank, 4, str(tmp_path), timeout=240)
    for rank, result in enumerate(results):
        for scheme in ("fsdp_tp_ep", "strided"):
            got = result[scheme]
            assert got["bad"] == [], (rank, scheme)
            # exactly this rank's parameter bytes (the router biases are not stored) + headers
            assert got["read"] == got["share"] + headers, (rank, scheme, got)
            assert got["read"] < 0.6 * total, (rank, scheme, got)
        native = result["native"]
        assert native["bad"] == [], rank
        distcp = sum(f.stat().st_size for f in (tmp_path / "native").rglob("*.distcp"))
        # its own chunks (torch.save framing on each) and at most the small metadata file
        assert native["share"] <= native["read"] < 0.6 * distcp, (rank, native, distcp)


def checksum_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    from moetrain.checkpoint import checksums, find_latest, verify

    ckpts = Path(root) / "checkpoints"
    hashed: list[str] = []
    real = checksums.sha256

    def recording(path: Path) -> str:
        hashed.append(str(path.relative_to(ckpts)))
        return real(path)

    checksums.sha256 = recording  # type: ignore[assignment]  # this spawned process only
    out: dict[str, Any] = {"good": verify(ckpts / "00000001"), "hashed_good": list(hashed)}
    out["bad"] = verify(ckpts / "00000002")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["latest"] = find_latest(ckpts).name  # type: ignore[union-attr]
        hashed.clear()
        out["latest_again"] = find_latest(ckpts).name  # type: ignore[union-attr]
    out["hashed_again"] = [h for h in hashed if h.startswith("00000001")]
    out["warnings"] = [str(w.message) for w in caught]
    return out


@pytest.mark.timeout(300)
def test_checksums_are_split_over_ranks_with_one_verdict(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    ckpts = tmp_path / "checkpoints"
    for step in ("00000001", "00000002"):
        save_model(model, ckpts / step, extra_files={"notes/a.txt": "a", "notes/b.txt": "b"})
    shard = next((ckpts / "00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    results = run_distributed(checksum_rank, 3, str(tmp_path), timeout=200)
    listed = sorted(str(p.relative_to(ckpts)) for p in (ckpts / "00000001").rglob("*")
                    if p.is_file() and p.name != "checksums.json")  # fmt: skip
    shares = [sorted(r["hashed_good"]) for r in results]
    assert sorted(h for share in shares for h in share) == listed  # each file hashed once
    assert all(len(s) <= -(-len(listed) // 3) for s in shares)
    for r in results:
        assert r["good"] is None
        assert r["bad"] == results[0]["bad"] and shard.name in r["bad"]
        assert "checksum mismatch" in r["bad"]
        assert r["latest"] == r["latest_again"] == "00000001"
        assert any("00000002" in w and shard.name in w for w in r["warnings"])
        assert r["hashed_again"] == []  # verified once per process
