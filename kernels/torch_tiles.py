"""Torch tile backend: the CPU fast path (also runs on GPU).

Per pass over a few heads: text rows attend densely; every image row attends to the keys all
image queries see, one key set at a time (the text keys, then the pooled keys, made a few
pooled rows at a time and freed); then each query tile attends to its own image keys (a view
when contiguous, else gathered rows; a run of identical tiles, a band's interior, in one
call) and is merged in exactly through the log-sum-exps. The two phases never hold their
temporaries at once, and the number of heads per pass keeps all concurrent passes under a
fixed budget: the window path peaks at about what full SDPA does (its output plus a few
MiB), never at the O(N^2) of a dense mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import pool_tokens
from .problem import Problem
from .tiles import Run, TilePlan, default_tile, tile_plan
from .window import Window
from .workers import run_all, workers

SCRATCH_BYTES = 2 << 20  # all concurrent passes; SDPA on CPU allocates ~2.7 MiB beyond its output
# Query rows per call against text / shared keys: below 768 rows ATen's CPU flash kernel works
# in 64-row blocks, whose per-thread buffer is a quarter of the 256-row one's.
ROWS_PER_CALL = 512
POOLED_KEYS = 256  # pooled keys made and attended at once (each part is freed before the next)


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
    index: slices for contiguous rows, else gathers (into one buffer per tensor, made at the
    first gather and reused for the rest of the pass) and scatters."""

    def __init__(
        self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, heads: slice, image_start: int, gathered: tuple[int, int]
    ):
        self.q, self.k, self.v, self.out = (x[:, heads] for x in (q, k, v, out))
        self.all = (q, k, v, out)
        self.heads, self.image_start = heads, image_start
        seq = q.shape[2]
        self.offsets = torch.arange(heads.start, heads.stop, device=q.device)[:, None] * seq + image_start
        queries, keys = gathered
        self._buffer_rows = [len(self.offsets) * n for n in (queries, keys, keys, queries)]  # q, k, v, out
        self._buffers: list[Tensor | None] = [None] * 4

    def rows(self, span: tuple[int, int] | None, index: Tensor) -> slice | Tensor:
        if span is not None:
            return slice(self.image_start + span[0], self.image_start + span[1])
        return (self.offsets + index.to(self.offsets.device)).reshape(-1)

    def read(self, which: int, rows: slice | Tensor) -> Tensor:
        """Rows of q, k, v or out (which = 0..3): a view, or a gathered copy valid until the
        next read of the same tensor."""
        x = self.all[which]
        if isinstance(rows, slice):
            return x[:, self.heads, rows]
        if self._buffers[which] is None:
            self._buffers[which] = x.new_empty(self._buffer_rows[which], x.shape[-1])
        buffer = self._buffers[which][: rows.numel()]
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
    chunk = _heads_per_pass(plan, layout, window, dim, p.q.element_size(), rows, workers(p.q.device))

    def heads_pass(hs: slice) -> None:
        part = _Heads(qf, kf, vf, out, hs, layout.image_start, _gathered_rows(plan))
        for rows in text_rows:
            part.out[:, :, rows] = attend(part.q[:, :, rows], part.k, part.v, None, scale)[0]
        lse = _shared_attention(part, layout, window, p.pool_weight, scale)
        for run in plan.runs:
            _local_attention(part, run, masks, scale, lse)

    run_all(heads_pass, [slice(h, min(h + chunk, rows)) for h in range(0, rows, chunk)], p.q.device)
    out = out.view(batch, heads, seq, dim)
    return out if p.residual is None else out.add_(p.residual)


def _shared_attention(
    part: _Heads, layout: TokenLayout, window: Window, pool_weight: Tensor | None, scale: float
) -> Tensor | None:
    """Every image row's attention to the keys all image queries see (text, pooled), written to
    the output; returns its log-sum-exp per image row [1, heads, image_len], or None when
    there are no such keys. One key set at a time, over all image rows."""
    start = layout.image_start
    chunks = _row_chunks(start, start + layout.image_len)
    lse = None
    for i, (k, v) in enumerate(_shared_key_sets(part.k, part.v, layout, window, pool_weight)):
        if i == 0:
            lse_dtype = torch.promote_types(part.q.dtype, torch.float32)
            lse = part.q.new_empty((1, len(part.offsets), layout.image_len), dtype=lse_dtype)
        for rows in chunks:
            out_rows, lse_rows = part.out[:, :, rows], lse[:, :, rows.start - start : rows.stop - start]
            out, out_lse = attend(part.q[:, :, rows], k, v, None, scale)
            if i == 0:
                out_rows.copy_(out)
                lse_rows.copy_(out_lse)
            else:
                _merge(out_rows, lse_rows, out, out_lse)
        del k, v  # a pooled part is freed before the next one is made
    return lse


def _local_attention(part: _Heads, run: Run, masks: list[Tensor], scale: float, lse: Tensor | None) -> None:
    """The tiles of a run attend to their own image keys, written to the output or, when the
    shared keys' part is there (`lse`), merged into it."""
    tile = run.first
    if tile.query_span is not None and tile.key_span is not None:
        _batched_run(part, run, None if tile.mask is None else masks[tile.mask], scale, lse)
        return
    q_rows = part.rows(tile.query_span, tile.queries)
    q = part.read(0, q_rows)
    out = out_lse = None
    for key_part in tile.parts:
        k_rows = part.rows(key_part.span, key_part.keys)
        mask = None if key_part.mask is None else masks[key_part.mask]
        result = attend(q, part.read(1, k_rows), part.read(2, k_rows), mask, scale)
        if out is None:
            out, out_lse = result
        else:
            _merge(out, out_lse, *result)
    if lse is None:
        part.write(q_rows, out)
    elif isinstance(q_rows, slice):
        _merge(part.out[:, :, q_rows], lse[:, :, tile.query_span[0] : tile.query_span[1]], out, out_lse)
    else:
        index = tile.queries.to(lse.device)
        merged, merged_lse = part.read(3, q_rows), lse.index_select(2, index)
        _merge(merged, merged_lse, out, out_lse)
        part.write(q_rows, merged)
        lse.index_copy_(2, index, merged_lse)


def _batched_run(part: _Heads, run: Run, mask: Tensor | None, scale: float, lse: Tensor | None) -> None:
    """All tiles of a run in one kernel call, the tiles stacked as its batch dimension."""
    (q_start, q_stop), (k_start, k_stop) = run.first.query_span, run.first.key_span
    length, count = q_stop - q_start, run.count
    q = part.tiled(0, q_start, length, count, length)
    k, v = (part.tiled(i, k_start, k_stop - k_start, count, length) for i in (1, 2))
    out, out_lse = attend(q, k, v, mask, scale)  # [count, heads, length, (dim)]
    rows = slice(part.image_start + q_start, part.image_start + q_start + count * length)
    target = part.out[0, :, rows].unflatten(1, (count, length))
    if lse is None:
        target.copy_(out.transpose(0, 1))
    else:
        image = lse[0, :, q_start : q_start + count * length].unflatten(1, (count, length))
        _merge(target, image, out.transpose(0, 1), out_lse.transpose(0, 1))


def _merge(out: Tensor, lse: Tensor, other: Tensor, other_lse: Tensor) -> None:
    """Fold attention over another key set into (out, lse), in place: the result is one softmax
    over both key sets, the other part weighted by sigmoid(other_lse - lse)."""
    weight = torch.sigmoid(other_lse - lse)
    out.lerp_(other, weight[..., None].to(out.dtype))
    torch.logaddexp(lse, other_lse, out=lse)


def _row_chunks(start: int, stop: int) -> list[slice]:
    """start .. stop in slices of at most ROWS_PER_CALL query rows."""
    return [slice(s, min(s + ROWS_PER_CALL, stop)) for s in range(start, stop, ROWS_PER_CALL)]


def _shared_key_sets(
    k: Tensor, v: Tensor, layout: TokenLayout, window: Window, pool_weight: Tensor | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The key sets every image query sees, made one at a time: text (views), then the pooled
    image keys and values in parts of whole pooled rows, at most POOLED_KEYS each."""
    if layout.text_len:
        text = slice(layout.text_start, layout.text_start + layout.text_len)
        yield k[:, :, text], v[:, :, text]
    if not window.pool:
        return
    width, pool = layout.grid[-1], window.pool
    pooled_rows = layout.image_len // (width * pool)  # (frames x) height / pool
    rows_per_part = max(1, POOLED_KEYS // (width // pool))
    for row in range(0, pooled_rows, rows_per_part):
        stop = min(row + rows_per_part, pooled_rows)
        band = slice(layout.image_start + row * pool * width, layout.image_start + stop * pool * width)
        band_layout = TokenLayout(0, ((stop - row) * pool, width))  # pooling never crosses frames
        yield tuple(pool_tokens(x[:, :, band], band_layout, window, pool_weight) for x in (k, v))


def _gathered_rows(plan: TilePlan) -> tuple[int, int]:
    """The most (query, key) rows one head of a tile gathers (0 where every span is contiguous)."""
    lone = [run.first for run in plan.runs if run.count == 1]
    queries = max((t.queries.numel() for t in lone if t.query_span is None), default=0)
    keys = max((p.keys.numel() for t in lone for p in t.parts if p.span is None), default=0)
    return queries, keys


def _heads_per_pass(
    plan: TilePlan, layout: TokenLayout, window: Window, dim: int, itemsize: int, rows: int, passes: int
) -> int:
    """Heads per pass: at least one pass per worker, and the scratch of the concurrent passes
    within SCRATCH_BYTES. A pass holds the larger of its two phases' scratch (shared keys: a
    pooled part and a chunk's output; local: gathered rows and a run's output) plus the image
    rows' log-sum-exps; at FLUX sizes that is one head per pass."""
    gathered_queries, gathered_keys = _gathered_rows(plan)
    run_queries = max(r.count * r.first.queries.numel() for r in plan.runs)
    local = 2 * gathered_keys + 2 * gathered_queries + run_queries
    shared = 2 * min(POOLED_KEYS, window.pooled_len(layout)) + ROWS_PER_CALL
    per_head = dim * itemsize * max(local, shared) + 4 * layout.image_len
    return max(1, min(-(-rows // passes), SCRATCH_BYTES // (passes * per_head)))


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """(query, key) pairs this backend computes: shared keys densely, image keys per tile."""
    return window.shared_pairs(layout) + plan_for(layout, window).computed_pairs
