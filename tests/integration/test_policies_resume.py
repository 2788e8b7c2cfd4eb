"""Routing policies with state resume bit-exactly: the schedules are functions of the restored
optimizer step (the dense gate's Gumbel noise is counter-keyed by it) and the adaptive aux
coefficients are in the checkpoint. Two steps, save, resume, two more steps equal four steps
without a stop, exactly (losses, grad norms, aux losses, weights and coefficients)."""

from __future__ import annotations

import pytest
import torch

from moetrain.testing.layouts import train_steps, write_token_dir

ADAMW = ["optim=adamw", "optim.lr=0.003"]
ADAPTIVE = ["model.moe.adaptive_aux_smoothing=0.5", "model.moe.adaptive_aux_sensitivity=1.0"]
OPTIONS = {
    "dense_to_sparse_adaptive": ["model.moe.dense_to_sparse_steps=3", *ADAPTIVE],
    "top_k_schedule_frozen_adaptive": [
        "model.moe.top_k=3",
        "model.moe.top_k_schedule_steps=3",
        "model.moe.freeze_router=true",
        "model.moe.capacity_factor=1.0",
        *ADAPTIVE,
    ],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_resume_is_bit_exact(option, data_dir, tmp_path):
    overrides = [*ADAMW, *OPTIONS[option]]
    whole = train_steps(data_dir, overrides, 4)
    train_steps(data_dir, overrides, 2, run_dir=str(tmp_path), checkpoint_at=2)
    resumed = train_steps(data_dir, overrides, 2, run_dir=str(tmp_path))
    for key in ("loss", "grad_norm", "aux_loss"):
        assert resumed[key] == whole[key][2:], key
    coeffs = [name for name in whole["buffers"] if name.endswith("adaptive_aux.coeff")]
    assert len(coeffs) == 3  # one per MoE layer of tiny, checkpointed
    assert len({float(whole["buffers"][name]) for name in coeffs}) == 3  # each its own
    for part in ("weights", "buffers"):
        for name, w in whole[part].items():
            torch.testing.assert_close(resumed[part][name], w, rtol=0, atol=0, msg=name)
