"""Causal attention over a sequence split into load-balanced chunks: blockwise, with
online-softmax accumulation forward and the matching blockwise backward (FlashAttention's
recurrences), in pure torch. No collectives here: :mod:`moetrain.parallel.cp` gathers the key
and value chunks of every context-parallel rank and reduces their gradients.

Legend: B sequences, H query heads, G key/value heads (H % G == 0), c chunk length, k q/k head
dim, v value head dim, n = 2 x cp chunks per sequence.

Load balancing (as Megatron-Core and torchtitan): the sequence is cut in ``n = 2 x cp`` chunks of
equal length; cp rank ``r`` holds chunks ``r`` and ``n - 1 - r``, so every rank does the same
causal work (``n + 1`` blocks of ``c x c`` scores). Query chunk ``j`` attends to key chunks
``0..j``: the diagonal block with the causal mask, the others whole.

Everything is computed in fp32 (keys and values may come in another dtype: each block is cast
and expanded to the H query heads when used). Memory: only this rank's q, k, v, the output and
the log-sum-exp (``lse``, ``[B, H, 2c]``) are kept for backward; scores live one row tile at a
time (``TILE_SCORES``), forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two sequence chunks cp rank ``rank`` holds, in the order it holds them."""
    return rank, 2 * cp - 1 - rank


def owner(chunk: int, cp: int) -> tuple[int, int]:
    """(cp rank, slot 0 or 1 on that rank) of sequence chunk ``chunk``."""
    return (chunk, 0) if chunk < cp else (2 * cp - 1 - chunk, 1)


def local_positions(seq_len: int, rank: int, cp: int, device: torch.device | None = None) -> Tensor:
    """The sequence positions of cp rank ``rank``'s tokens, in its order (``[seq_len / cp]``)."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(j * c, (j + 1) * c, device=device) for j in chunk_ids(rank, cp)])


def _expand(t_BGcx: Tensor, heads: int) -> Tensor:
    """Key/value heads in fp32, repeated for their query heads (GQA)."""
    groups = t_BGcx.shape[1]
    t_BGcx = t_BGcx.float()
    return t_BGcx if groups == heads else t_BGcx.repeat_interleave(heads // groups, dim=1)


def _fold(t_BHcx: Tensor, groups: int) -> Tensor:
    """Gradients of expanded key/value heads summed back onto their G heads."""
    B, H, c, x = t_BHcx.shape
    return t_BHcx if groups == H else t_BHcx.view(B, groups, H // groups, c, x).sum(2)


# scores of at most this many elements (fp32: 4 MiB) exist at a time: queries go in row tiles
TILE_SCORES = 1 << 20


def _tiles(q_BHck: Tensor, key_len: int) -> list[slice]:
    """Row tiles of a query chunk whose ``[B, H, rows, key_len]`` scores fit ``TILE_SCORES``."""
    B, H, c, _ = q_BHck.shape
    rows = max(1, min(c, TILE_SCORES // max(1, B * H * key_len)))
    return [slice(a, min(a + rows, c)) for a in range(0, c, rows)]


def _scores(q_BHrk: Tensor, k_BHck: Tensor, scale: float, rows: slice, diagonal: bool) -> Tensor:
    """Scaled scores of the query rows ``rows`` of a chunk; on the diagonal block a key may be
    seen only by the rows at or after its own position."""
    s_BHrc = torch.matmul(q_BHrk, k_BHck.transpose(-1, -2)) * scale
    if diagonal:
        r = torch.arange(rows.start, rows.stop, device=s_BHrc.device)[:, None]
        future = torch.arange(s_BHrc.shape[-1], device=s_BHrc.device)[None, :] > r
        s_BHrc = s_BHrc.masked_fill(future, float("-inf"))
    return s_BHrc


@torch.no_grad()
def blockwise_forward(
    q_BHnk: list[Tensor],
    q_chunks: tuple[int, ...],
    k_BGck: list[Tensor],
    v_BGcv: list[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention of the query chunks ``q_BHnk[i]`` (sequence chunk ``q_chunks[i]``) over the key
    and value chunks of the whole sequence (``k_BGck[m]``: chunk m, natural order).

    Returns ``(o_BH(2c)v, lse_BH(2c))``: the outputs and log-sum-exps of the query chunks,
    concatenated in the order given."""
    H = q_BHnk[0].shape[1]
    outs, lses = [], []
    for q, j in zip(q_BHnk, q_chunks):
        B, _, c, _ = q.shape
        o = q.new_zeros(B, H, c, v_BGcv[0].shape[-1], dtype=torch.float32)
        lse = q.new_full((B, H, c), float("-inf"), dtype=torch.float32)
        tiles = _tiles(q, c)
        for m in range(j + 1):
            k, v = _expand(k_BGck[m], H), _expand(v_BGcv[m], H)  # once per key chunk
            for rows in tiles:
                n = rows.stop if m == j else c  # the diagonal block: keys up to the tile's end
                s = _scores(q[:, :, rows], k[:, :, :n], scale, rows, diagonal=m == j)
                lse_b = torch.logsumexp(s, dim=-1)
                o_b = torch.matmul(torch.exp(s - lse_b[..., None]), v[:, :, :n])
                old = lse[:, :, rows]
                new = torch.logaddexp(old, lse_b)  # online softmax: rescale the sum so far
                o[:, :, rows] = (
                    o[:, :, rows] * torch.exp(old - new)[..., None]
                    + o_b * torch.exp(lse_b - new)[..., None]
                )
                lse[:, :, rows] = new
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@torch.no_grad()
def blockwise_backward(
    do_BHnv: Tensor,
    q_BHnk: Tensor,
    o_BHnv: Tensor,
    lse_BHn: Tensor,
    q_chunks: tuple[int, ...],
    k_BGck: list[Tensor],
    v_BGcv: list[Tensor],
    scale: float,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Gradients of :func:`blockwise_forward` (its query chunks concatenated on dim 2).

    Returns ``(dq_BHnk, dk, dv)``: ``dk[m]``/``dv[m]`` this rank's contribution to key/value
    chunk m (zeros for chunks no local query sees); the caller sums them over the ranks."""
    H, G = q_BHnk.shape[1], k_BGck[0].shape[1]
    c = k_BGck[0].shape[2]
    delta_BHn = (do_BHnv * o_BHnv).sum(-1)  # rowsum(dO * O): the softmax Jacobian's diagonal term
    dq = torch.zeros_like(q_BHnk)
    dk = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for k in k_BGck]
    dv = [torch.zeros(v.shape, dtype=torch.float32, device=v.device) for v in v_BGcv]
    for i, j in enumerate(q_chunks):
        chunk = slice(i * c, (i + 1) * c)
        q_c, do_c, lse_c, delta_c = (t[:, :, chunk] for t in (q_BHnk, do_BHnv, lse_BHn, delta_BHn))
        dq_c = dq[:, :, chunk]  # a view: accumulated in place
        tiles = _tiles(q_c, c)
        for m in range(j + 1):
            k, v = _expand(k_BGck[m], H), _expand(v_BGcv[m], H)  # once per key chunk
            dk_m, dv_m = torch.zeros_like(k), torch.zeros_like(v)  # at H heads, folded below
            for rows in tiles:
                n = rows.stop if m == j else c
                q, do, lse, delta = (t[:, :, rows] for t in (q_c, do_c, lse_c, delta_c))
                p = torch.exp(_scores(q, k[:, :, :n], scale, rows, m == j) - lse[..., None])
                dv_m[:, :, :n] += torch.matmul(p.transpose(-1, -2), do)
                ds = p * (torch.matmul(do, v[:, :, :n].transpose(-1, -2)) - delta[..., None])
                dq_c[:, :, rows] += torch.matmul(ds, k[:, :, :n]) * scale
                dk_m[:, :, :n] += torch.matmul(ds.transpose(-1, -2), q) * scale
            dk[m] += _fold(dk_m, G)
            dv[m] += _fold(dv_m, G)
    return dq, dk, dv
