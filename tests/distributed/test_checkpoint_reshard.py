"""A checkpoint saved at one layout loads at another: the next steps' losses equal what the
saving layout computes (AdamW, so the optimizer moments are resharded too)."""

from __future__ import annotations

import pytest

from moetrain.testing import run_distributed
from moetrain.testing.layouts import train_steps, train_steps_rank, write_token_dir

ADAMW = ["optim=adamw", "optim.lr=0.003"]
PAIRS = {
    "ep2_folded_to_single": ((4, ["parallel.ep=2"]), (1, [])),
    "single_to_ep4": ((1, []), (4, ["parallel.ep=4"])),
    "tp2_to_pp2": ((2, ["parallel.tp=2"]), (2, ["parallel.pp=2"])),
    # context parallelism: saved with every sequence split over 2 ranks, loaded whole, and back
    "cp2_ep2_to_single": ((4, ["parallel.cp=2", "parallel.ep=2"]), (1, [])),
    "single_to_cp2": ((1, []), (2, ["parallel.cp=2"])),
    "pp2_ep2_to_tp2_ep2": (
        (4, ["parallel.pp=2", "parallel.ep=2"]),
        (4, ["parallel.tp=2", "parallel.ep=2"]),
    ),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


def run(world: int, data_dir: str, overrides: list[str], steps: int, run_dir: str, at=None):
    if world == 1:
        return train_steps(data_dir, overrides, steps, run_dir=run_dir, checkpoint_at=at)
    results = run_distributed(
        train_steps_rank, world, data_dir, overrides, steps, run_dir, at, timeout=200
    )
    return results[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_reshard(pair, data_dir, tmp_path):
    (world_a, layout_a), (world_b, layout_b) = PAIRS[pair]
    saved = run(world_a, data_dir, [*ADAMW, *layout_a], 4, str(tmp_path / "a"), at=2)
    ckpt = tmp_path / "a" / "checkpoints" / "00000002"
    assert (ckpt / "checksums.json").is_file()
    resumed = run(
        world_b,
        data_dir,
        [*ADAMW, *layout_b, f"checkpoint.resume={ckpt}"],
        2,
        str(tmp_path / "b"),
    )
    assert resumed["loss"] == pytest.approx(saved["loss"][2:], rel=1e-5)
    assert resumed["aux_loss"] == pytest.approx(saved["aux_loss"][2:], rel=1e-5)


STOCHASTIC_PAIRS = {
    "jitter_dp2_to_tp2": (["model.moe.router_jitter=0.1"], (2, []), (2, ["parallel.tp=2"])),
    "random_tp2_ep2_to_pp2": (
        ["model.moe.router_type=random", "model.moe.z_loss_coeff=0.0"],
        (4, ["parallel.tp=2", "parallel.ep=2"]),
        (2, ["parallel.pp=2"]),
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", list(STOCHASTIC_PAIRS))
def test_stochastic_routing_resumes_at_another_layout(pair, data_dir, tmp_path):
    """Routing noise is keyed by (seed, step, layer, token position), not RNG state: a run
    resumed at another layout draws what the saving run drew (tensor-parallel ranks agree)."""
    router, (world_a, layout_a), (world_b, layout_b) = STOCHASTIC_PAIRS[pair]
    saved = run(world_a, data_dir, [*ADAMW, *router, *layout_a], 4, str(tmp_path / "a"), at=2)
    ckpt = tmp_path / "a" / "checkpoints" / "00000002"
    overrides = [*ADAMW, *router, *layout_b, f"checkpoint.resume={ckpt}"]
    resumed = run(world_b, data_dir, overrides, 2, str(tmp_path / "b"))
    assert resumed["loss"] == pytest.approx(saved["loss"][2:], rel=1e-5)
    assert resumed["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)


@pytest.mark.timeout(300)
def test_cp2_resumes_bit_exactly_on_the_same_layout(data_dir, tmp_path):
    """Every rank restores its own data position and RNG state: the resumed steps' losses are
    the uninterrupted run's, bit for bit."""
    layout = [*ADAMW, "parallel.cp=2", "model.moe.router_jitter=0.1"]
    saved = run(2, data_dir, layout, 4, str(tmp_path / "a"), at=2)
    ckpt = tmp_path / "a" / "checkpoints" / "00000002"
    resumed = run(2, data_dir, [*layout, f"checkpoint.resume={ckpt}"], 2, str(tmp_path / "b"))
    assert resumed["loss"] == saved["loss"][2:]
    assert resumed["grad_norm"] == saved["grad_norm"][2:]


FSSDP = ["parallel.expert_sharding=fssdp"]


@pytest.mark.timeout(300)
def test_fssdp_checkpoints_interchange_with_ep(data_dir, tmp_path):
    """Saved under FSSDP (experts sharded on F over 2 ranks), resumed under EP (sharded on E),
    saved again and resumed under FSSDP over 4 ranks: every resumed step's loss is the one the
    uninterrupted FSSDP run computes (AdamW: the optimizer moments travel too)."""
    saved = run(2, data_dir, [*ADAMW, *FSSDP], 4, str(tmp_path / "a"), at=2)
    ckpt_a = tmp_path / "a" / "checkpoints" / "00000002"
    ep = run(2, data_dir, [*ADAMW, "parallel.ep=2", f"checkpoint.resume={ckpt_a}"], 1,
             str(tmp_path / "b"), at=3)  # fmt: skip
    assert ep["loss"] == pytest.approx(saved["loss"][2:3], rel=1e-5)
    ckpt_b = tmp_path / "b" / "checkpoints" / "00000003"
    back = run(4, data_dir, [*ADAMW, *FSSDP, f"checkpoint.resume={ckpt_b}"], 1, str(tmp_path / "c"))
    assert back["loss"] == pytest.approx(saved["loss"][3:], rel=1e-5)
    assert back["aux_loss"] == pytest.approx(saved["aux_loss"][3:], rel=1e-5)


@pytest.mark.timeout(300)
def test_load_model_from_a_4_rank_checkpoint(data_dir, tmp_path):
    """moetrain.load_model reads a checkpoint saved by ep2 on 4 ranks in one process, with no
    process group: its logits give the validation loss the saving run computed."""
    import torch
    import torch.nn.functional as F

    import moetrain
    from moetrain.data import WindowDataset
    from moetrain.data.dataset import TokenSource

    # per-head qk-norm makes tiny a Qwen3-MoE, so the checkpoint also exports to the hub
    saved = run(4, data_dir, ["parallel.ep=2", "model.qk_norm=head"], 3, str(tmp_path / "a"), at=3)
    model = moetrain.load_model(tmp_path / "a" / "checkpoints" / "00000003")
    source = TokenSource(data_dir)
    _, val_tokens = source.split(0.05)
    inputs, targets = WindowDataset(val_tokens, 32).fixed_batches(1, 2)[0]
    with torch.no_grad():
        logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert loss == pytest.approx(saved["val_loss"], rel=1e-5)
    # and moetrain-convert turns the 4-rank checkpoint into a Qwen3-MoE hub directory that
    # transformers loads (--verify compares its logits)
    from moetrain.checkpoint.convert import main as convert

    out = tmp_path / "hf"
    args = ["--from", str(tmp_path / "a"), "--to", str(out), "--format", "hf", "--verify"]
    assert convert(args) == 0
    back = moetrain.load_model(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def init_from_rank(rank: int, world: int, data_dir: str, overrides: list[str]) -> dict:
    """Two steps of a run started from ``checkpoint.init_from``, with the checkpoint bytes this
    rank read and its share: the bytes of the hub's (fp32) tensors it holds."""
    from torch.distributed.tensor import DTensor

    from moetrain.checkpoint import bytes_read

    seen: dict = {}

    def prepare(trainer) -> None:  # the weights were read while the trainer was built
        tensors = {id(t): t for t in trainer.state_module.state_dict(keep_vars=True).values()}
        seen["share"] = sum(
            (t.to_local() if isinstance(t, DTensor) else t).numel() * 4 for t in tensors.values()
        )
        seen["read"] = bytes_read()  # a fresh process: everything it has read

    out = train_steps(data_dir, overrides, 2, prepare=prepare)
    return {"loss": out["loss"], **seen}


@pytest.mark.timeout(400)
def test_init_from_hugging_face_at_any_layout(data_dir, tmp_path):
    """checkpoint.init_from=<HF dir> at ep2 on 4 ranks and at pp2 x tp2 trains exactly as one
    process started from the same weights in a native checkpoint, each rank reading only the
    parts of the hub tensors it holds (plus the safetensors header)."""
    import torch

    from moetrain.checkpoint.hf import save_hf
    from moetrain.checkpoint.native import save_model
    from moetrain.models import Transformer
    from moetrain.testing.layouts import layout_config

    qwen3 = ["model.qk_norm=head"]  # tiny with per-head qk-norm: a Qwen3-MoE
    torch.manual_seed(123)
    model = Transformer(layout_config(data_dir, qwen3).model)
    with torch.no_grad():  # logits far from uniform: a start from these weights shows in the loss
        model.output.weight.mul_(50)
    save_hf(model, tmp_path / "hf", "qwen3_moe", max_shard_bytes=2_000_000)  # 6 files
    save_model(model, tmp_path / "native")
    ref = run(1, data_dir, [*qwen3, f"checkpoint.init_from={tmp_path / 'native'}"], 2, None)
    fresh = run(1, data_dir, qwen3, 1, None)
    assert abs(fresh["loss"][0] - ref["loss"][0]) > 0.5
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    # every file's header, at most (a rank opens only the files holding its tensors)
    header = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    total = sum(f.stat().st_size for f in files)
    for world, layout in ((4, ["parallel.ep=2"]), (4, ["parallel.pp=2", "parallel.tp=2"])):
        overrides = [*qwen3, *layout, f"checkpoint.init_from={tmp_path / 'hf'}"]
        ranks = run_distributed(init_from_rank, world, data_dir, overrides, timeout=200)
        assert ranks[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5), layout
        print(layout, [(got["read"], got["share"]) for got in ranks], "of", total)
        for rank, got in enumerate(ranks):
            # never more than what it holds (expert-bias buffers are not stored: not read)
            assert 0.9 * got["share"] < got["read"] <= got["share"] + header, (layout, rank, got)
            assert got["read"] < 0.75 * total, (layout, rank, got)
