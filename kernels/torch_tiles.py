"""Torch tile backend: the CPU fast path (also runs on GPU).

Each query tile attends to its own image keys (a view when contiguous, else gathered rows)
with a fused attention kernel, a run of identical tiles (a band's interior) in one call; each
group of tiles (a contiguous range of image tokens) attends once to the keys every image
query sees (text, pooled), and the two parts are merged exactly through their log-sum-exps. Work is done a few heads at a time so that the scratch
memory stays under a fixed budget: the window path peaks at about what full SDPA does (its
output plus a few MiB), never at the O(N^2) of a dense mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import pool_tokens
from .problem import Problem
from .tiles import Group, Run, Tile, TilePlan, default_tile, tile_plan
from .window import Window
from .workers import run_all, workers

SCRATCH_BYTES = 4 << 20  # all concurrent passes; SDPA on CPU allocates ~2.7 MiB beyond its output
# Query rows per call against text / shared keys: below 768 rows ATen's CPU flash kernel works
# in 64-row blocks, whose per-thread buffer is a quarter of the 256-row one's.
ROWS_PER_CALL = 512


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

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        heads: slice,
        image_start: int,
        gathered: tuple[int, int],
    ):
        self.q, self.k, self.v, self.out = (x[:, heads] for x in (q, k, v, out))
        self.all = (q, k, v, out)
        self.heads, self.image_start = heads, image_start
        seq = q.shape[2]
        self.offsets = torch.arange(heads.start, heads.stop, device=q.device)[:, None] * seq + image_start
        # gathers of q, k, v rows reuse one buffer each: hundreds of short-lived ~MiB tensors
        # would otherwise fragment the allocator and raise the peak memory
        rows = [len(self.offsets) * gathered[which > 0] for which in range(3)]
        self.buffers = [q.new_empty(n, q.shape[-1]) if n else None for n in rows]

    def rows(self, span: tuple[int, int] | None, index: Tensor) -> slice | Tensor:
        if span is not None:
            return slice(self.image_start + span[0], self.image_start + span[1])
        return (self.offsets + index.to(self.offsets.device)).reshape(-1)

    def read(self, which: int, rows: slice | Tensor) -> Tensor:
        x = self.all[which]
        if isinstance(rows, slice):
            return x[:, self.heads, rows]
        buffer = self.buffers[which][: rows.numel()]
        torch.index_select(x.view(-1, x.shape[-1]), 0, rows, out=buffer)
        return buffer.view(1, len(self.offsets), -1, x.shape[-1])

    def tiled(self, which: int, first: int, length: int, count: int, step: int) -> Tensor:
        """[count, heads, length, dim]: `length` image rows from first + i * step for tile i;
        overlapping views of the same storage, no copy."""
        x = self.all[which]
        _, head_stride, row_stride, _ = x.stride()
        return x.as_strided(
            (count, len(self.offsets), length, x.shape[-1]),
            (step * row_stride, head_stride, row_stride, 1),
            x.storage_offset() + self.heads.start * head_stride + (self.image_start + first) * row_stride,
        )

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
    text_rows = _row_chunks(layout.text_start, layout.text_start + layout.text_len)
    chunk = _heads_per_chunk(plan, layout, window, dim, p.q.element_size(), rows, workers(p.q.device))

    def heads_pass(hs: slice) -> None:
        part = _Heads(qf, kf, vf, out, hs, layout.image_start, _gathered_rows(plan))
        for rows in text_rows:
            part.out[:, :, rows] = attend(part.q[:, :, rows], part.k, part.v, None, scale)[0]
        shared = _shared_keys(part.k, part.v, layout, window, p.pool_weight)
        for group in plan.groups:
            _group(part, group, masks, shared, scale)

    run_all(heads_pass, [slice(h, min(h + chunk, rows)) for h in range(0, rows, chunk)], p.q.device)
    out = out.view(batch, heads, seq, dim)
    return out if p.residual is None else out.add_(p.residual)


def _group(
    part: _Heads, group: Group, masks: list[Tensor], shared: tuple[Tensor, Tensor] | None, scale: float
) -> None:
    """Local attention of each tile of the group, then one merge with the shared keys."""
    lse = (
        None
        if shared is None
        else part.q.new_empty(
            (1, len(part.offsets), group.stop - group.start),
            dtype=torch.promote_types(part.q.dtype, torch.float32),
        )
    )
    for run in group.runs:
        tile = run.first
        mask = None if tile.mask is None else masks[tile.mask]
        if run.count > 1:
            _batched_run(part, run, mask, scale, lse, group.start)
            continue
        q_rows = part.rows(tile.query_span, tile.queries)
        k_rows = part.rows(tile.key_span, tile.keys)
        out, tile_lse = attend(part.read(0, q_rows), part.read(1, k_rows), part.read(2, k_rows), mask, scale)
        part.write(q_rows, out)
        if lse is not None:
            _put(lse, tile, group.start, tile_lse)
    if shared is None:
        return
    first = part.image_start + group.start  # sequence row of the group's lse[..., 0]
    for rows in _row_chunks(first, part.image_start + group.stop):
        shared_out, shared_lse = attend(part.q[:, :, rows], *shared, None, scale)
        # one softmax over both key sets: the shared part's weight is sigmoid(lse_shared - lse_local)
        local_lse = lse[:, :, rows.start - first : rows.stop - first]
        weight = torch.sigmoid(shared_lse - local_lse).to(shared_out.dtype)
        part.out[:, :, rows].lerp_(shared_out, weight[..., None])


def _row_chunks(start: int, stop: int) -> list[slice]:
    """start .. stop in slices of at most ROWS_PER_CALL query rows."""
    return [slice(s, min(s + ROWS_PER_CALL, stop)) for s in range(start, stop, ROWS_PER_CALL)]


def _batched_run(
    part: _Heads, run: Run, mask: Tensor | None, scale: float, lse: Tensor | None, start: int
) -> None:
    """All tiles of a run in one kernel call, the tiles stacked as its batch dimension."""
    (q_start, q_stop), (k_start, k_stop) = run.first.query_span, run.first.key_span
    length, count = q_stop - q_start, run.count
    q = part.tiled(0, q_start, length, count, length)
    k, v = (part.tiled(i, k_start, k_stop - k_start, count, length) for i in (1, 2))
    out, run_lse = attend(q, k, v, mask, scale)
    rows = slice(part.image_start + q_start, part.image_start + q_start + count * length)
    part.out[0, :, rows].unflatten(1, (count, length)).copy_(out.transpose(0, 1))
    if lse is not None:
        lse[0, :, q_start - start : q_start - start + count * length].unflatten(1, (count, length)).copy_(
            run_lse.transpose(0, 1)
        )


def _put(lse: Tensor, tile: Tile, start: int, value: Tensor) -> None:
    if tile.query_span is not None:
        lse[:, :, tile.query_span[0] - start : tile.query_span[1] - start] = value
    else:
        lse.index_copy_(2, (tile.queries - start).to(lse.device), value)


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


def _gathered_rows(plan: TilePlan) -> tuple[int, int]:
    """The most (query, key) rows one head of a tile gathers (0 where every span is contiguous)."""
    tiles = [t for g in plan.groups for t in g.tiles]
    queries = max((t.queries.numel() for t in tiles if t.query_span is None), default=0)
    return queries, max((t.keys.numel() for t in tiles if t.key_span is None), default=0)


def _heads_per_chunk(
    plan: TilePlan, layout: TokenLayout, window: Window, dim: int, itemsize: int, rows: int, passes: int
) -> int:
    """Heads per pass: at least one pass per worker, and the scratch of the concurrent passes
    (gathered rows, partial outputs, shared keys) within SCRATCH_BYTES."""
    runs = [r for g in plan.groups for r in g.runs]
    gathered = max((2 * r.first.keys.numel() for r in runs if r.first.key_span is None), default=0)
    queries = max(r.count * r.first.queries.numel() for r in runs)
    group = max(g.stop - g.start for g in plan.groups)
    shared = layout.text_len + window.pooled_len(layout)
    per_head = dim * itemsize * (gathered + 2 * queries + group + 2 * shared + layout.text_len) + 4 * group
    return max(1, min(-(-rows // passes), SCRATCH_BYTES // (passes * per_head)))


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """(query, key) pairs this backend computes: shared keys densely, image keys per tile."""
    return window.shared_pairs(layout) + plan_for(layout, window).computed_pairs
