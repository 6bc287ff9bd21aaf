"""Torch tile backend: the CPU fast path (also runs on GPU).

Each query tile attends to its own key set (a view when contiguous, else gathered rows) with
a fused attention kernel, and separately to the keys every image query sees (text, pooled);
the parts are merged exactly through their log-sum-exps. Work is done a few heads at a time
so the scratch memory stays below a fixed budget: the window path never needs more memory
than full attention does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import pool_tokens
from .tiles import TilePlan, default_tile, tile_plan
from .window import Window

SCRATCH_BYTES = 4 << 20


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention [1, h, n, d] returning (output, log-sum-exp); `mask` is a 0/-inf bias.

    On CPU this is ATen's fused flash kernel (what SDPA runs); elsewhere plain float32 math.
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(dim=-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One softmax over the union of the parts' keys, from each part's output and log-sum-exp."""
    if len(parts) == 1:
        return parts[0][0]
    total = torch.stack([lse for _, lse in parts]).logsumexp(dim=0)
    merged = sum(out.float() * (lse - total).exp()[..., None] for out, lse in parts)
    return merged.to(parts[0][0].dtype)


def plan_for(layout: TokenLayout, window: Window) -> TilePlan:
    return tile_plan(layout, window, default_tile(layout, window))


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    window: Window,
    *,
    pool_weight: Tensor | None,
    residual: Tensor | None,
    scale: float,
) -> Tensor:
    batch, heads, seq, dim = q.shape
    plan = plan_for(layout, window)
    masks = plan.additive_masks(q.dtype, q.device)
    rows = batch * heads
    qf, kf, vf = (x.contiguous().view(1, rows, seq, dim) for x in (q, k, v))
    out = torch.empty_like(qf)
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    chunk = _heads_per_chunk(plan, layout, window, dim, q.element_size(), rows)
    for h0 in range(0, rows, chunk):
        hs = slice(h0, min(h0 + chunk, rows))
        q_h, k_h, v_h = qf[:, hs], kf[:, hs], vf[:, hs]
        if layout.text_len:
            out[:, hs, text] = attend(q_h[:, :, text], k_h, v_h, None, scale)[0]
        shared = _shared_keys(k_h, v_h, layout, window, pool_weight)
        offsets = torch.arange(hs.start, hs.stop, device=q.device)[:, None] * seq + layout.image_start
        for tile in plan.tiles:
            query_rows = _where(tile.query_span, tile.queries, offsets, layout.image_start)
            key_rows = _where(tile.key_span, tile.keys, offsets, layout.image_start)
            q_t = _read(qf, hs, query_rows)
            k_t, v_t = _read(kf, hs, key_rows), _read(vf, hs, key_rows)
            parts = [attend(q_t, k_t, v_t, None if tile.mask is None else masks[tile.mask], scale)]
            if shared is not None:
                parts.append(attend(q_t, *shared, None, scale))
            _write(out, hs, query_rows, merge(parts))
    out = out.reshape(batch, heads, seq, dim)
    return out if residual is None else out.add_(residual)


def _shared_keys(
    k: Tensor, v: Tensor, layout: TokenLayout, window: Window, pool_weight: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """Keys and values every image query sees (text, then pooled), or None if there are none."""
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    if not window.pool:
        return (k[:, :, text], v[:, :, text]) if layout.text_len else None
    pooled = [pool_tokens(x, layout, window, pool_weight) for x in (k, v)]
    if not layout.text_len:
        return pooled[0], pooled[1]
    return torch.cat([k[:, :, text], pooled[0]], dim=2), torch.cat([v[:, :, text], pooled[1]], dim=2)


def _where(span: tuple[int, int] | None, index: Tensor, offsets: Tensor, start: int) -> slice | Tensor:
    """Rows of image tokens `index`: a sequence slice when contiguous, else flat indices of
    those rows, for each head of `offsets`, into the [rows * seq, dim] view."""
    if span is not None:
        return slice(start + span[0], start + span[1])
    return (offsets + index.to(offsets.device)).reshape(-1)


def _read(x: Tensor, hs: slice, rows: slice | Tensor) -> Tensor:
    if isinstance(rows, slice):
        return x[:, hs, rows]
    return x.view(-1, x.shape[-1]).index_select(0, rows).view(1, hs.stop - hs.start, -1, x.shape[-1])


def _write(out: Tensor, hs: slice, rows: slice | Tensor, value: Tensor) -> None:
    if isinstance(rows, slice):
        out[:, hs, rows] = value
    else:
        out.view(-1, out.shape[-1]).index_copy_(0, rows, value.reshape(-1, value.shape[-1]))


def _heads_per_chunk(
    plan: TilePlan, layout: TokenLayout, window: Window, dim: int, itemsize: int, rows: int
) -> int:
    """Heads per pass so that gathered keys, partial outputs and pooled keys fit SCRATCH_BYTES."""
    gathered = max((2 * t.keys.numel() for t in plan.tiles if t.key_span is None), default=0)
    queries = max(t.queries.numel() for t in plan.tiles)
    per_head = dim * itemsize * (gathered + 5 * queries + layout.text_len + 2 * window.pooled_len(layout))
    return max(1, min(rows, SCRATCH_BYTES // per_head))


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """(query, key) pairs this backend computes: shared keys densely, image keys per tile."""
    return window.shared_pairs(layout) + plan_for(layout, window).computed_pairs
