"""A model to read a checkpoint into: allocated, not initialized."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moetrain.models.config import ModelConfig

if TYPE_CHECKING:
    from moetrain.models import Transformer


# model state that is training state (the adaptive aux coefficients): loading weights from a
# source without it (init_from, a hub or Megatron checkpoint) keeps its initial value
FRESH_STATE = ".adaptive_aux.coeff"


def empty_model(cfg: ModelConfig) -> Transformer:
    """A :class:`~moetrain.models.Transformer` of ``cfg`` on the CPU whose checkpointed tensors
    are allocated but hold garbage until a checkpoint fills them: built on the meta device, so no
    weights are drawn (a random init would only be overwritten). Tied weights are tied again
    (``to_empty`` replaces parameters one by one) and the non-persistent buffers (per-step
    scratch state, which construction zeroes) are zeroed."""
    from moetrain.models import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    saved = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in saved:
                buffer.zero_()
    return model
