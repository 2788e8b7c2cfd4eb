"""Document masking under tensor and pipeline parallelism: a masked packed window's logits equal
each document run alone through the single-process model (atol 1e-5, fp32).

- tp2: the residual stream is a sequence chunk ``[B, S/2, D]`` but attention runs on the
  gathered sequence, with the full-sequence mask and cos/sin.
- pp2: the documents reach the second stage as keyword arguments, both in the training
  schedule (``schedule.step(..., **kwargs)``, 1F1B, split into micro-batches) and in
  evaluation's ``pipeline_forward``.
"""

from __future__ import annotations

import os

import pytest
import torch

from moetrain.testing import run_distributed

EOS = 63
V = 64
S = 16
BASE = dict(vocab_size=V, dim=32, num_layers=4, num_heads=4, num_kv_heads=2,
            dense_hidden_dim=48, init_std=0.2)  # fmt: skip
MLA = dict(attention="mla", num_kv_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=6, v_head_dim=12)  # fmt: skip
# model variants per layout (tensor parallelism does not support MLA)
VARIANTS = {
    "tp": [{}, {"sliding_window": 3}, {"qk_norm": "head"}],
    "pp": [{}, {"sliding_window": 3}, MLA],
}


def rows() -> list[list[torch.Tensor]]:
    """Two rows of S=16 tokens: [doc1+eos, doc2+eos, partial doc3] and another packing."""
    g = torch.Generator().manual_seed(3)
    out = []
    for lengths in ([5, 7, 4], [2, 9, 5]):
        docs = [torch.randint(0, EOS, (n,), generator=g) for n in lengths]
        for doc in docs[:-1]:
            doc[-1] = EOS
        out.append(docs)
    return out


def build(model_kw: dict, ctx):
    """The single-process reference and this rank's parallel model, same weights."""
    from moetrain.models import ModelConfig, Transformer
    from moetrain.moe.config import MoEConfig
    from moetrain.parallel.parallelize import parallelize

    cfg = ModelConfig(**{**BASE, **model_kw}, moe=MoEConfig(dim=32, hidden_dim=24))
    torch.manual_seed(0)
    ref = Transformer(cfg).eval()
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert meta.init_seed == ref.init_seed
    pm = parallelize(meta, ctx)
    pm.materialize(meta.init_specs(), meta.init_seed)
    for chunk in pm.chunks:
        chunk.eval()
    return ref, pm


def worst_difference(logits_BSV: torch.Tensor, ref) -> float:
    """Max |packed - alone| over every document of every row."""
    worst = 0.0
    with torch.no_grad():
        for b, row in enumerate(rows()):
            start = 0
            for doc in row:
                alone = ref(doc[None])[0]
                got = logits_BSV[b, start : start + len(doc)]
                worst = max(worst, float((got - alone).abs().max()))
                start += len(doc)
    return worst


def tp_worker(rank: int, world: int) -> list[float]:
    from moetrain.models.documents import document_inputs
    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.dims import ParallelDims

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = init_parallel(ParallelDims(world_size=world, tp=world))
    tokens = torch.stack([torch.cat(row) for row in rows()])
    out = []
    for model_kw in VARIANTS["tp"]:
        ref, pm = build(model_kw, ctx)
        with torch.no_grad():
            logits = pm.chunks[0](tokens, **document_inputs(tokens, EOS, "restart"))
        out.append(worst_difference(logits, ref))
    return out


def pp_worker(rank: int, world: int) -> list[dict]:
    from moetrain.models.documents import document_inputs
    from moetrain.parallel.context import init_parallel
    from moetrain.parallel.dims import ParallelDims
    from moetrain.parallel.pipeline import build_schedule, pipeline_forward

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = init_parallel(ParallelDims(world_size=world, pp=world))
    tokens = torch.stack([torch.cat(row) for row in rows()])
    kw = document_inputs(tokens, EOS, "restart")
    first, last = ctx.coords.pp == 0, ctx.coords.pp == world - 1
    out = []
    for model_kw in VARIANTS["pp"]:
        ref, pm = build(model_kw, ctx)
        seen: list[tuple] = []  # what this rank's stage received as kwargs
        pm.chunks[0].register_forward_pre_hook(
            lambda _m, _a, k, seen=seen: seen.append(tuple(k["documents_BS"].shape)),
            with_kwargs=True,
        )
        with torch.no_grad():
            evaluated = pipeline_forward(pm, ctx, tokens, **kw)
        loss_fn = lambda logits, _target: logits.float().logsumexp(-1).mean()  # noqa: E731
        schedule = build_schedule(pm, ctx, "1f1b", 2, loss_fn, micro_batch=1, seq_len=S)
        trained = schedule.step(
            *((tokens,) if first else ()), target=tokens if last else None, **kw
        )
        res: dict = {"seen": seen}
        if last:
            res["eval"] = worst_difference(evaluated, ref)
            res["train"] = worst_difference(trained.detach(), ref)
        out.append(res)
    return out


@pytest.mark.timeout(240)
def test_tp2_packed_window_equals_each_document_alone():
    results = run_distributed(tp_worker, 2, timeout=200)
    for rank, worst in enumerate(results):
        print(f"tp2 rank {rank}: max |packed - alone| per variant = {worst}")
        assert max(worst) < 1e-5


@pytest.mark.timeout(240)
def test_pp2_packed_window_equals_each_document_alone():
    """Both stages received the documents as kwargs — the whole window in evaluation, one row
    per micro-batch in the 1F1B schedule — and the last stage's logits (evaluation and the
    training schedule's outputs) are each document's."""
    results = run_distributed(pp_worker, 2, timeout=200)
    for rank, per_variant in enumerate(results):
        for res in per_variant:
            assert res["seen"] == [(2, S), (1, S), (1, S)], f"rank {rank}: {res['seen']}"
    for res in results[-1]:
        print(f"pp2 last stage: max |packed - alone| eval {res['eval']:.2e} "
              f"train {res['train']:.2e}")  # fmt: skip
        assert res["eval"] < 1e-5 and res["train"] < 1e-5
