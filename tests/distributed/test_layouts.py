"""The correctness contract: every parallel layout trains the same model as one process.

For each layout, three SGD steps of ``tiny`` (dropless, fp32, z-loss on) on the same global
batch give the same per-step losses, grad norms and aux/z-loss values (rtol 1e-5) as the
single-process run over the same micro-batches, and the same final weights (atol 1e-5). FSSDP
layouts (``parallel.expert_sharding=fssdp``) are in the matrix like the others.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.testing import run_distributed
from moetrain.testing.layouts import (
    assert_each_matches,
    assert_matches,
    train_steps,
    train_steps_each_rank,
    train_steps_rank,
    write_token_dir,
)

LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2"]),
    "pp2_interleaved": (
        2,
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    ),
    "fsdp2": (2, []),
    "hsdp_2x2": (4, ["parallel.dp_replicate=2"]),
    "ep2_folded_dp4": (4, ["parallel.ep=2"]),
    "tp2_ep2_etp1": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "tp2_ep2_etp2": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
    # context parallelism, its attention and token gather recomputed in backward (more rows, at
    # a longer sequence: test_context_parallel.py)
    "cp2_ac": (2, ["parallel.cp=2", "parallel.activation_checkpointing=true"]),
    # overlapped (2 chunks) hierarchical all-to-all, 4 ranks posing as 2 nodes x 2
    "ep4_overlap2_hierarchical": (
        4,
        [
            "parallel.ep=4",
            "parallel.ep_overlap_chunks=2",
            "parallel.ep_a2a=hierarchical",
            "parallel.ep_ranks_per_node=2",
        ],
    ),
    # 3 chunks with the experts FSDP-sharded over edp=2 and activation checkpointing
    "ep2_folded_dp4_overlap3_ac": (
        4,
        ["parallel.ep=2", "parallel.ep_overlap_chunks=3", "parallel.activation_checkpointing=true"],
    ),
    # FSSDP: every expert sharded over all ranks, materialized where its tokens are
    "fssdp2": (2, ["parallel.expert_sharding=fssdp"]),
    "fssdp4": (4, ["parallel.expert_sharding=fssdp"]),
    # FSSDP over the 2 ranks of each pipeline stage, HSDP dense weights, no rematerialization,
    # activation checkpointing
    "pp2_fssdp2_hsdp_ac": (
        4,
        [
            "parallel.expert_sharding=fssdp",
            "parallel.pp=2",
            "parallel.dp_replicate=2",
            "parallel.fssdp_rematerialize=false",
            "parallel.activation_checkpointing=true",
        ],
    ),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


_reference_cache: dict[tuple[str, ...], dict] = {}


def reference(data_dir: str, overrides: list[str]) -> dict:
    key = tuple(overrides)
    if key not in _reference_cache:
        _reference_cache[key] = train_steps(data_dir, list(overrides))
    return _reference_cache[key]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_single_process(layout, data_dir):
    world, overrides = LAYOUTS[layout]
    results = run_distributed(train_steps_rank, world, data_dir, overrides, 3, timeout=200)
    assert_matches(results, reference(data_dir, []))


# --- beyond dropless: capacity, the global aux-loss scope, activation checkpointing ----------

CAPACITY = ["model.moe.capacity_factor=1.0"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "world, layout", [(2, ["parallel.ep=2"]), (4, ["parallel.expert_sharding=fssdp"])]
)
def test_capacity_factor_is_per_rank_local_tokens(data_dir, world, layout):
    """Capacity is computed from each rank's own micro-batch (as Megatron-Core), which is the
    micro-batch the single-process run sees at the same position: identical drops (with EP, and
    with FSSDP, whose placement only moves the kept rows)."""
    ref = reference(data_dir, CAPACITY)
    results = run_distributed(
        train_steps_rank, world, data_dir, [*CAPACITY, *layout], 3, timeout=200
    )
    assert_matches(results, ref)


def running_union_counts_reference(trainer) -> None:
    """Single-process reference for aux_loss_scope=global at dp=2, written out independently:
    micro-batches 2j and 2j+1 run on ranks 0 and 1 at accumulation step j, and micro-batch k's
    f is formed from the running sum, over steps j' <= k // 2, of both ranks' counts. The layer
    adds what ``reduce_global_counts`` returns to its running sum, so the hook returns the pair's
    union counts at even k and zeros at odd k."""
    original = trainer.train_batches.next_global_batch
    layers = trainer.moe_layers

    def next_global_batch(global_batch_size):
        batches = original(global_batch_size)
        counts = []
        with torch.no_grad():  # the same routing the training forward will compute
            for inputs, _ in batches:
                trainer.model(inputs)
                counts.append([layer.last_stats.tokens_per_expert_E.clone() for layer in layers])
        for i, layer in enumerate(layers):
            adds = [
                counts[k][i] + counts[k + 1][i] if k % 2 == 0 else torch.zeros_like(counts[k][i])
                for k in range(len(batches))
            ]
            layer.reduce_global_counts = lambda c, q=adds: q.pop(0) if q else c  # eval: local
        for layer in layers:
            assert layer.stats_log is not None
            layer.stats_log.clear()  # the counting forwards are not training calls
        return batches

    trainer.train_batches.next_global_batch = next_global_batch


@pytest.mark.timeout(240)
def test_global_aux_scope_fsdp2_is_the_running_union_of_micro_batches(data_dir):
    overrides = ["model.moe.aux_loss_scope=global"]
    ref = train_steps(data_dir, overrides, prepare=running_union_counts_reference)
    local = reference(data_dir, [])  # micro-batch scope: a different loss, so the test can fail
    assert ref["aux_loss"] != pytest.approx(local["aux_loss"], rel=1e-5)
    results = run_distributed(train_steps_rank, 2, data_dir, overrides, 3, timeout=200)
    assert_matches(results, ref)


# --- stochastic routing: counter-keyed noise keeps the contract ------------------------------

STOCHASTIC = {
    "jitter": ["model.moe.router_jitter=0.1"],
    "random": ["model.moe.router_type=random", "model.moe.z_loss_coeff=0.0"],
}


@pytest.mark.parametrize("router", list(STOCHASTIC))
def test_stochastic_routing_changes_the_run(router, data_dir):
    """The noise is live in the configuration the matrix below uses (so its rows can fail)."""
    ref = reference(data_dir, STOCHASTIC[router])
    assert ref["loss"][1:] != pytest.approx(reference(data_dir, [])["loss"][1:], rel=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["fsdp2", "ep2", "tp2", "tp2_ep2_etp1", "pp2_1f1b"])
def test_stochastic_routing_at_every_layout(layout, data_dir):
    """Jitter and the random router draw each token's noise from (seed, step, layer, global
    token position): every layout draws what the single process draws (one launch per layout
    runs both routers in turn)."""
    world, overrides = LAYOUTS[layout]
    runs = [[*keys, *overrides] for keys in STOCHASTIC.values()]
    per_rank = run_distributed(train_steps_each_rank, world, data_dir, runs, 3, timeout=280)
    refs = {router: reference(data_dir, keys) for router, keys in STOCHASTIC.items()}
    assert_each_matches(per_rank, refs, layout)


@pytest.mark.timeout(240)
def test_activation_checkpointing_tp2_ep2(data_dir):
    """Recomputed blocks (all-to-all and sequence-parallel collectives run again in backward)
    give the same step, and statistics are not recorded twice."""
    overrides = ["parallel.activation_checkpointing=true", "parallel.tp=2", "parallel.ep=2"]
    results = run_distributed(train_steps_rank, 4, data_dir, overrides, 3, timeout=200)
    assert_matches(results, reference(data_dir, []))


@pytest.mark.gpu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["ep2", "tp2", "pp2_1f1b", "cp2_ac"])
def test_layout_on_gpus_with_nccl(layout, data_dir):
    """The NCCL path (device tensors in every collective) on 2 GPUs, against one GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    world, overrides = LAYOUTS[layout]
    results = run_distributed(
        train_steps_rank, world, data_dir, overrides, 3, timeout=200, backend="nccl"
    )
    assert_matches(results, train_steps(data_dir, []))


# --- document masking (data.document_mask): the same contract on packed short documents -----

# short documents (4..24 tokens), so that every 32-token window holds document boundaries; the
# 500-token documents of data_dir leave most windows without one, and masking would be a no-op
DOC_MAX_LEN = 24
DOC_MASK = ["data.document_mask=true"]
DOC_MASK_LAYOUTS = ["tp2", "pp2_1f1b", "pp2_interleaved", "ep2"]
_doc_reference_cache: dict[tuple[str, ...], dict] = {}


@pytest.fixture(scope="module")
def doc_data_dir(tmp_path_factory) -> str:
    import numpy as np

    from moetrain.data.token_file import TokenDirWriter
    from moetrain.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(n)) for n in rng.integers(4, DOC_MAX_LEN + 1, 3000)]
    for doc in docs:
        doc[-1] = tok.require_eos()
    path = str(tmp_path_factory.mktemp("doc_tokens"))
    with TokenDirWriter(path, tok) as writer:
        writer.write(np.concatenate(docs), len(docs))
        writer.commit()
    return path


def doc_reference(data_dir: str, overrides: list[str]) -> dict:
    key = tuple(overrides)
    if key not in _doc_reference_cache:
        _doc_reference_cache[key] = train_steps(data_dir, list(overrides))
    return _doc_reference_cache[key]


def test_document_windows_hold_boundaries_and_the_mask_is_live(doc_data_dir):
    """Every window of the masked rows below holds an eos before its last input position (no
    gap between eos tokens exceeds DOC_MAX_LEN < seq_len 32), and masking changes the run (so
    the rows can fail)."""
    from moetrain.data.dataset import TokenSource
    from moetrain.data.tokenizer import ByteTokenizer

    tokens = TokenSource(doc_data_dir).tokens
    eos_at = (tokens == ByteTokenizer().require_eos()).nonzero()[0]
    assert eos_at[0] < DOC_MAX_LEN and (eos_at[1:] - eos_at[:-1]).max() <= DOC_MAX_LEN
    masked = doc_reference(doc_data_dir, DOC_MASK)
    plain = doc_reference(doc_data_dir, [])
    assert masked["loss"] != pytest.approx(plain["loss"], rel=1e-3)
    assert masked["val_loss"] != pytest.approx(plain["val_loss"], rel=1e-3)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", DOC_MASK_LAYOUTS)
def test_document_mask_layout_equals_single_process(layout, doc_data_dir):
    """Masked rows of the matrix: tensor parallelism (mask over the gathered sequence), the
    pipeline schedules (documents reach every stage as schedule kwargs; evaluation through
    ``pipeline_forward``), expert parallelism."""
    world, overrides = LAYOUTS[layout]
    results = run_distributed(
        train_steps_rank, world, doc_data_dir, [*DOC_MASK, *overrides], 3, timeout=200
    )
    assert_matches(results, doc_reference(doc_data_dir, DOC_MASK))
