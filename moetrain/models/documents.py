"""Document masking for packed training windows (``data.document_mask``).

Legend: B sequences, S sequence length, H heads, k/v head dims.

A window is a packed token stream in which every document ends with the tokenizer's eos id.
As Megatron-LM's ``get_ltor_masks_and_position_ids`` with ``reset_attention_mask`` and
``reset_position_ids``: the document of position s is the number of eos tokens strictly before
s (an eos belongs to the document it ends; the token after it starts the next one). Query i may
attend key j iff ``j <= i``, ``doc(i) == doc(j)`` and, with a sliding window w,
``i - w < j``. Positions ``restart`` at 0 in each document, or ``continue`` as ``0..S-1``.

Two equivalent attention paths take the mask (:func:`attention_mask` picks one per device):

- everywhere: ``F.scaled_dot_product_attention`` with a boolean ``[B, 1, S, S]`` mask
  (:func:`document_mask`; B * S * S bytes per forward, built once and shared by the layers);
- CUDA: ``torch.nn.attention.flex_attention`` (compiled) with a ``BlockMask`` built from the
  same rule (:func:`flex_block_mask`), which skips fully masked blocks instead of reading them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

try:  # torch >= 2.5; without it every device takes the SDPA boolean-mask path
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # pragma: no cover - the supported torch releases all have it
    _flex = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# What the model hands its attention layers: a boolean mask (SDPA) or a flex BlockMask.
AttentionMask = Union[Tensor, "BlockMask"]

POSITIONS = ("restart", "continue")

_compiled: dict[str, Any] = {}  # compiled flex functions, built on first CUDA use


def document_ids(tokens_BS: Tensor, eos_id: int) -> Tensor:
    """``[B, S]`` int64: the number of ``eos_id`` tokens strictly before each position (each
    row's first document is 0; an eos token has the id of the document it ends)."""
    eos_BS = (tokens_BS == eos_id).long()
    return eos_BS.cumsum(dim=1) - eos_BS


def document_positions(documents_BS: Tensor) -> Tensor:
    """``[B, S]`` int64: each position's offset from the start of its document (``documents_BS``
    from :func:`document_ids`, nondecreasing along S)."""
    B, S = documents_BS.shape
    index_BS = torch.arange(S, device=documents_BS.device).expand(B, S)
    starts_BS = torch.ones_like(documents_BS, dtype=torch.bool)
    starts_BS[:, 1:] = documents_BS[:, 1:] != documents_BS[:, :-1]
    # the latest document start at or before each position
    start_of_BS = torch.where(starts_BS, index_BS, 0).cummax(dim=1).values
    return index_BS - start_of_BS


def document_mask(documents_BS: Tensor, sliding_window: int | None = None) -> Tensor:
    """``[B, 1, S, S]`` bool, True where query i may attend key j: causal, same document and,
    with ``sliding_window`` w, ``i - w < j`` (broadcasts over heads in SDPA)."""
    S = documents_BS.shape[1]
    i_S1 = torch.arange(S, device=documents_BS.device)[:, None]
    j_1S = i_S1.T
    allowed_SS = j_1S <= i_S1
    if sliding_window is not None:
        allowed_SS = allowed_SS & (j_1S > i_S1 - sliding_window)
    same_BSS = documents_BS[:, :, None] == documents_BS[:, None, :]
    return (same_BSS & allowed_SS)[:, None]


def flex_block_mask(documents_BS: Tensor, sliding_window: int | None = None) -> BlockMask:
    """The :func:`document_mask` rule as a flex-attention ``BlockMask`` (heads broadcast).
    On CUDA the mask is built by a compiled kernel (no ``[B, S, S]`` tensor); elsewhere
    eagerly (tests compare the flex forward with the SDPA path on CPU)."""
    if _flex is None:
        raise RuntimeError("data.document_mask: this torch has no flex_attention")
    B, S = documents_BS.shape

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = (kv_idx <= q_idx) & (documents_BS[b, q_idx] == documents_BS[b, kv_idx])
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        return allowed

    create = _flex.create_block_mask
    if documents_BS.is_cuda:
        create = _compiled_fn("create_block_mask", create)
    return create(mask_mod, B, None, S, S, device=documents_BS.device)


def flex_attention(
    q_BHSk: Tensor, k_BGSk: Tensor, v_BGSv: Tensor, block_mask: BlockMask, scale: float | None
) -> Tensor:
    """Flex attention under ``block_mask`` (``scale`` None = ``1/sqrt(k)``), compiled on CUDA
    (eager flex materializes the scores and has no backward on CPU). Returns ``o_BHSv``."""
    assert _flex is not None  # a BlockMask exists only where flex does
    fn = _flex.flex_attention
    if q_BHSk.is_cuda:
        fn = _compiled_fn("flex_attention", fn)
    gqa = q_BHSk.shape[1] != k_BGSk.shape[1]
    out = fn(q_BHSk, k_BGSk, v_BGSv, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    assert isinstance(out, Tensor)
    return out


def _compiled_fn(name: str, fn: Any) -> Any:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def attention_mask(documents_BS: Tensor, sliding_window: int | None = None) -> AttentionMask:
    """The mask the attention layers take for ``documents_BS``: a flex ``BlockMask`` on CUDA,
    the boolean ``[B, 1, S, S]`` :func:`document_mask` elsewhere. Build it once per forward."""
    if documents_BS.is_cuda and _flex is not None:
        return flex_block_mask(documents_BS, sliding_window)
    return document_mask(documents_BS, sliding_window)


def document_inputs(tokens_BS: Tensor, eos_id: int, positions: str = "restart") -> dict:
    """The forward keyword arguments for a packed window ``tokens_BS`` [B, S]:
    ``{"documents_BS": [B, S] int64, "positions_BS": [B, S] int64}``, without ``positions_BS``
    when ``positions`` is ``continue`` (the model then numbers positions ``0..S-1``). Raises
    ``ValueError`` naming ``data.document_positions`` for another value."""
    if positions not in POSITIONS:
        raise ValueError(
            f"data.document_positions: must be one of {', '.join(POSITIONS)}; got {positions!r}"
        )
    documents_BS = document_ids(tokens_BS, eos_id)
    if positions == "continue":
        return {"documents_BS": documents_BS}
    return {"documents_BS": documents_BS, "positions_BS": document_positions(documents_BS)}
