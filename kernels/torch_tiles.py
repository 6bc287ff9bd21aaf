"""Torch tile backend: the CPU fast path (also runs on GPU).

Each query tile attends to its own image keys (a view when contiguous, else gathered rows)
and, separately, to the keys every image query sees (text, pooled: views, no copy) with a
fused attention kernel; the two parts are merged exactly through their log-sum-exps. Work is
done a few heads at a time, on every core, with the scratch memory of all passes under a
fixed budget: the window path needs no more memory than full attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import pool_tokens
from .problem import Problem
from .tiles import Tile, TilePlan, default_tile, tile_plan
from .window import Window
from .workers import run_all, workers

SCRATCH_BYTES = 2 << 20  # full SDPA on CPU needs about 2.7 MiB beyond its output (FLUX shapes)
TEXT_ROWS = 128  # text queries per call, to keep their partial output small


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, *, fused: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention [1, h, n, d] returning (output, log-sum-exp); `mask` is a 0/-inf bias.

    Fused (the default on CPU) is ATen's CPU flash kernel, what SDPA runs there; elsewhere
    plain float32 math.
    """
    if fused is None:
        fused = q.device.type == "cpu"
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(dim=-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def plan_for(layout: TokenLayout, window: Window) -> TilePlan:
    return tile_plan(layout, window, default_tile(layout, window))


class _Heads:
    """q, k, v, out of a few heads, viewed as [1, heads, seq, dim], with row access by image
    index: slices for contiguous rows, else gathers and scatters."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, heads: slice, image_start: int):
        self.q, self.k, self.v, self.out = (x[:, heads] for x in (q, k, v, out))
        self.all = (q, k, v, out)
        self.heads, self.image_start = heads, image_start
        seq = q.shape[2]
        self.offsets = torch.arange(heads.start, heads.stop, device=q.device)[:, None] * seq + image_start

    def rows(self, span: tuple[int, int] | None, index: Tensor) -> slice | Tensor:
        if span is not None:
            return slice(self.image_start + span[0], self.image_start + span[1])
        return (self.offsets + index.to(self.offsets.device)).reshape(-1)

    def read(self, which: int, rows: slice | Tensor) -> Tensor:
        x = self.all[which]
        if isinstance(rows, slice):
            return x[:, self.heads, rows]
        return x.view(-1, x.shape[-1]).index_select(0, rows).view(1, len(self.offsets), -1, x.shape[-1])

    def write(self, rows: slice | Tensor, value: Tensor) -> None:
        out = self.all[3]
        if isinstance(rows, slice):
            out[:, self.heads, rows] = value
        else:
            out.view(-1, out.shape[-1]).index_copy_(0, rows, value.reshape(-1, value.shape[-1]))


def window_attention(p: Problem) -> Tensor:
    layout, window, scale = p.layout, p.window, p.scale
    batch, heads, seq, dim = p.q.shape
    plan = plan_for(layout, window)
    masks = plan.additive_masks(p.q.dtype, p.q.device)
    rows = batch * heads
    qf, kf, vf = (x.contiguous().view(1, rows, seq, dim) for x in (p.q, p.k, p.v))
    out = torch.empty_like(qf)
    chunk = _heads_per_chunk(plan, layout, window, dim, p.q.element_size(), rows, workers(p.q.device))

    def heads_pass(hs: slice) -> None:
        part = _Heads(qf, kf, vf, out, hs, layout.image_start)
        for row in range(layout.text_start, layout.text_start + layout.text_len, TEXT_ROWS):
            text = slice(row, min(row + TEXT_ROWS, layout.text_start + layout.text_len))
            part.out[:, :, text] = attend(part.q[:, :, text], part.k, part.v, None, scale)[0]
        shared = _shared_keys(part.k, part.v, layout, window, p.pool_weight)
        for tile in plan.tiles:
            _tile(part, tile, masks, shared, scale)

    run_all(heads_pass, [slice(h, min(h + chunk, rows)) for h in range(0, rows, chunk)], p.q.device)
    out = out.view(batch, heads, seq, dim)
    return out if p.residual is None else out.add_(p.residual)


def _tile(
    part: _Heads, tile: Tile, masks: list[Tensor], shared: tuple[Tensor, Tensor] | None, scale: float
) -> None:
    """One tile: its local keys, then the shared keys, merged into one softmax."""
    q_rows = part.rows(tile.query_span, tile.queries)
    k_rows = part.rows(tile.key_span, tile.keys)
    q = part.read(0, q_rows)
    mask = None if tile.mask is None else masks[tile.mask]
    out, lse = attend(q, part.read(1, k_rows), part.read(2, k_rows), mask, scale)
    if shared is not None:
        shared_out, shared_lse = attend(q, *shared, None, scale)
        # the shared keys' share of the joint softmax is sigmoid(lse_shared - lse_local)
        out = out.lerp_(shared_out, torch.sigmoid(shared_lse - lse).to(out.dtype)[..., None])
    part.write(q_rows, out)


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


def _heads_per_chunk(
    plan: TilePlan, layout: TokenLayout, window: Window, dim: int, itemsize: int, rows: int, passes: int
) -> int:
    """Heads per pass: at least one pass per worker, and the scratch of the concurrent passes
    (gathered rows, partial outputs, shared keys) within SCRATCH_BYTES."""
    gathered = max((2 * t.keys.numel() for t in plan.tiles if t.key_span is None), default=0)
    queries = max(t.queries.numel() for t in plan.tiles)
    pooled = 2 * (layout.text_len + window.pooled_len(layout)) if window.pool else 0  # concatenated
    per_head = dim * itemsize * (gathered + 3 * queries + pooled + min(layout.text_len, TEXT_ROWS))
    return max(1, min(-(-rows // passes), SCRATCH_BYTES // (passes * per_head)))


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """(query, key) pairs this backend computes: shared keys densely, image keys per tile."""
    return window.shared_pairs(layout) + plan_for(layout, window).computed_pairs
