"""End to end: a tiny Llama made with ``transformers`` -> moetrain-upcycle (copy, 8 experts top-2)
-> ``moetrain-train checkpoint.init_from=...`` for 50 steps on the built-in corpus. The first
logged loss equals the dense model's loss on that batch, and the loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")

TRAIN = [
    "train.global_batch_size=4",
    "train.micro_batch_size=4",
    "train.seq_len=64",
    "train.eval_batches=1",
    "train.eval_interval=0",
    "train.log_interval=1",
    "train.peak_flops_per_device=1e12",
    "optim.warmup_steps=5",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


def train(run_dir, model_dir, model: str, init_from, steps: int) -> list[float]:
    cmd = [
        sys.executable, "-m", "moetrain.train", *TRAIN, f"train.steps={steps}",
        f"hydra.searchpath=[file://{model_dir}]", f"model={model}",
        f"checkpoint.init_from={init_from}", f"run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_upcycled_llama_continues_from_the_dense_loss(tmp_path):
    from moetrain.checkpoint.hf import config_from_hf
    from moetrain.checkpoint.safetensors_io import read_config
    from moetrain.checkpoint.upcycle import main as upcycle

    config = transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    # the dense model as a moetrain model config (for the reference run)
    _, dense_cfg = config_from_hf(read_config(tmp_path / "dense"))
    (tmp_path / "dense_cfg" / "model").mkdir(parents=True)
    (tmp_path / "dense_cfg" / "model" / "dense.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.structured(dense_cfg))
    )
    args = ["--mode", "copy", "--num-experts", "8", "--top-k", "2"]
    assert upcycle(["--from", str(tmp_path / "dense"), "--to", str(tmp_path / "moe"), *args]) == 0
    dense = train(tmp_path / "run_dense", tmp_path / "dense_cfg", "dense", tmp_path / "dense", 1)
    # the model config moetrain-upcycle wrote beside the weights (model/upcycled.yaml)
    moe = train(tmp_path / "run_moe", tmp_path / "moe", "upcycled", tmp_path / "moe", 50)
    print(f"dense first loss {dense[0]:.6f}; upcycled {moe[0]:.6f} -> {moe[-1]:.6f}")
    assert len(moe) == 50
    assert moe[0] == pytest.approx(dense[0], rel=1e-5)
    assert sum(moe[-5:]) / 5 < moe[0] - 0.5
