"""Megatron-Core checkpoints written and read sharded (2 gloo processes, CPU, fp32): a tiny MoE
GPTModel saved by megatron-core's own ``dist_checkpointing`` at expert parallelism 2 and at
tensor parallelism 2 imports into moetrain with megatron-core's logits; moetrain's
``--format megatron`` export of it loads back into megatron-core at that parallelism with the
same logits. A pipeline-parallel (2 stages) save imports with the logits megatron-core gives
after loading that save into one process. ``checkpoint.init_from`` of a Megatron checkpoint at
expert parallelism 2 trains as one process does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

import moetrain
from moetrain.checkpoint import convert
from moetrain.testing import run_distributed

ATOL = 1e-5
LAYOUTS = {
    "ep2": dict(expert_model_parallel_size=2),
    "tp2": dict(tensor_model_parallel_size=2),
}


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))


def save_worker(rank: int, world_size: int, overrides: dict, save_dir: str) -> torch.Tensor:
    """Build the tiny GPT sharded as ``overrides`` say, save it as Megatron-LM does; its
    logits (gathered: every rank has them all)."""
    from moetrain.testing import mcore_gpt as mg

    mg.patch_for_cpu()
    args = mg.tiny_args(**overrides)
    mg.init_parallel(args)
    model = mg.build_gpt(args)
    mg.save_checkpoint(model, args, save_dir)
    return mg.logits(model, tokens())


def load_worker(rank: int, world_size: int, overrides: dict, release_dir: str) -> torch.Tensor:
    """A freshly drawn sharded GPT loaded from ``release_dir`` (an iteration directory) by
    megatron-core: its logits."""
    from moetrain.testing import mcore_gpt as mg

    mg.patch_for_cpu()
    args = mg.tiny_args(**overrides)
    mg.init_parallel(args)
    model = mg.build_gpt(args, seed=7, bias_seed=None)
    mg.load_checkpoint(model, release_dir)
    return mg.logits(model, tokens())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_megatron_checkpoint_round_trip(tmp_path, layout):
    overrides = LAYOUTS[layout]
    ckpt = tmp_path / "megatron"
    want = run_distributed(save_worker, 2, overrides, str(ckpt), timeout=180)
    assert torch.equal(want[0], want[1])
    with torch.no_grad():
        diff = (moetrain.load_model(ckpt)(tokens()) - want[0]).abs().max().item()
    print(f"{layout}: import max |logit diff| vs megatron-core = {diff:.3g}")
    assert diff <= ATOL
    out = tmp_path / "exported"
    assert convert.main(["--from", str(ckpt), "--to", str(out), "--format", "megatron"]) == 0
    got = run_distributed(load_worker, 2, overrides, str(out / "release"), timeout=180)
    diff = max((g - want[0]).abs().max().item() for g in got)
    print(f"{layout}: export loaded at {layout}: max |logit diff| = {diff:.3g}")
    assert diff <= ATOL


def pp_save_worker(rank: int, world_size: int, save_dir: str) -> None:
    from moetrain.testing import mcore_gpt as mg

    mg.patch_for_cpu()
    args = mg.tiny_args(pipeline_model_parallel_size=2)
    mg.init_parallel(args)
    mg.save_checkpoint(mg.build_gpt(args), args, save_dir)


@pytest.mark.timeout(240)
def test_pipeline_parallel_save_imports(tmp_path):
    ckpt = tmp_path / "megatron"
    run_distributed(pp_save_worker, 2, str(ckpt), timeout=180)
    # the oracle: megatron-core itself reads the two-stage save into one process
    (want,) = run_distributed(load_worker, 1, {}, str(ckpt / "iter_0000010"), timeout=180)
    with torch.no_grad():
        diff = (moetrain.load_model(ckpt)(tokens()) - want).abs().max().item()
    print(f"pp2: import max |logit diff| vs megatron-core = {diff:.3g}")
    assert diff <= ATOL


def model_overrides(cfg) -> list[str]:
    """``model.*=...`` overrides giving a run the model config ``cfg``."""
    import dataclasses

    def value(v) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        return str(v).replace(" ", "")

    fields = dataclasses.asdict(cfg)
    moe = fields.pop("moe")
    return [f"model.{k}={value(v)}" for k, v in fields.items()] + [
        f"model.moe.{k}={value(v)}" for k, v in moe.items()
    ]


@pytest.mark.timeout(300)
def test_init_from_megatron_at_ep2(tmp_path):
    """``checkpoint.init_from=<megatron dir>`` at expert parallelism 2 (each rank keeps its
    experts of the whole checkpoint) trains exactly as one process started from it."""
    from moetrain.testing.layouts import train_steps, train_steps_rank, write_token_dir

    data = write_token_dir(str(tmp_path / "tokens"), num_tokens=5_000)
    ckpt = tmp_path / "megatron"
    run_distributed(save_worker, 1, {"padded_vocab_size": 384}, str(ckpt), timeout=180)
    run = [*model_overrides(moetrain.load_model(ckpt).cfg), "train.global_batch_size=4"]
    run.append("train.seq_len=16")
    overrides = [*run, f"checkpoint.init_from={ckpt}"]
    ref = train_steps(data, overrides, 2)
    fresh = train_steps(data, run, 1)  # no init_from: another first loss
    assert abs(fresh["loss"][0] - ref["loss"][0]) > 0.01
    got = run_distributed(train_steps_rank, 2, data, [*overrides, "parallel.ep=2"], 2, timeout=200)
    print(f"init_from at ep2: losses {got[0]['loss']} vs one process {ref['loss']}")
    assert got[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
