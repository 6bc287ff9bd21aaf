"""Torch tile backend: pure torch over ATen's flash kernel; the CPU fallback where the native kernel
cannot be built, and it also runs on GPU.

Per pass over a few heads: text rows attend densely; each query tile attends to its own image
keys (a view when contiguous, else gathered rows; a run of identical tiles, a band's interior,
in one call) and writes its output rows and their log-sum-exps; then every image row attends
to the keys all image queries see, one key set at a time (the text keys, then the pooled keys,
made a few pooled rows at a time and freed), merged in exactly through the log-sum-exps over
contiguous chunks of rows. Tiles first keep the per-tile work to a few kernel calls (no
read-merge-write of scattered rows). The two phases never hold their temporaries at once, and
the number of heads per pass keeps all concurrent passes under a fixed budget: the window path
peaks at about what full SDPA does (its output plus a few MiB), never at the O(N^2) of a dense
mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import pooled_parts
from .problem import Problem
from .tiles import Run, TilePlan, default_tile, tile_plan
from .window import Window
from .workers import run_all, workers

# Our scratch across all concurrent passes. SDPA on CPU holds 1.4 - 2.7 MiB beyond its output
# at FLUX sizes; ATen's per-call buffers come on top of this budget, and the shared keys' phase
# runs last, when the whole output is already resident.
SCRATCH_BYTES = 1 << 20
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
    """q, k, v, out of a few heads, viewed as [1, heads, seq, dim], and their image rows, read
    by image index: slices where contiguous, else gathered (into one buffer per tensor, made at
    the first gather and reused for the rest of the pass)."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        heads: slice,
        layout: TokenLayout,
        gathered: tuple[int, int],
    ):
        self.q, self.k, self.v, self.out = (x[:, heads] for x in (q, k, v, out))
        self.count = heads.stop - heads.start
        image = slice(layout.image_start, layout.image_start + layout.image_len)
        self.image = tuple(x[:, :, image] for x in (self.q, self.k, self.v, self.out))
        queries, keys = gathered
        self._buffer_rows = (queries, keys, keys)  # q, k, v
        self._buffers: list[Tensor | None] = [None] * 3
        self._views: dict[tuple[int, int], Tensor] = {}

    def read(self, which: int, span: tuple[int, int] | None, index: Tensor) -> Tensor:
        """Image rows of q, k or v (which = 0..2): a view, or a gathered copy valid until the
        next read of the same tensor."""
        x = self.image[which]
        if span is not None:
            return x[:, :, span[0] : span[1]]
        return torch.index_select(x, 2, index.to(x.device), out=self._buffer(which, index.numel()))

    def _buffer(self, which: int, rows: int) -> Tensor:
        """[1, heads, rows, dim] at the start of tensor `which`'s gather buffer (one view per
        size, kept: tiles of a plan gather a few distinct sizes many times)."""
        view = self._views.get((which, rows))
        if view is None:
            dim = self.image[which].shape[-1]
            if self._buffers[which] is None:
                self._buffers[which] = self.image[which].new_empty(
                    self.count * self._buffer_rows[which] * dim
                )
            view = self._buffers[which][: self.count * rows * dim].view(1, self.count, rows, dim)
            self._views[which, rows] = view
        return view

    def free_buffers(self) -> None:
        """Drop the gather buffers (the next gather makes them again)."""
        self._buffers = [None] * 3
        self._views.clear()

    def tiled(self, which: int, first: int, length: int, count: int, step: int) -> Tensor:
        """[count, heads, length, dim]: `length` image rows from first + i * step for tile i;
        overlapping views of the same storage, no copy."""
        x = self.image[which]
        _, head_stride, row_stride, _ = x.stride()
        return x.as_strided(
            (count, self.count, length, x.shape[-1]),
            (step * row_stride, head_stride, row_stride, 1),
            x.storage_offset() + first * row_stride,
        )

    def write(
        self,
        span: tuple[int, int] | None,
        index: Tensor,
        value: Tensor,
        lse: Tensor | None,
        value_lse: Tensor,
    ) -> None:
        """Image rows of the output (and of the image rows' log-sum-exps, when kept)."""
        if span is not None:
            self.image[3][:, :, span[0] : span[1]] = value
            if lse is not None:
                lse[:, :, span[0] : span[1]] = value_lse
        else:
            index = index.to(value.device)
            self.image[3].index_copy_(2, index, value)
            if lse is not None:
                lse.index_copy_(2, index, value_lse)


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
    shared = bool(layout.text_len or window.pool)
    lse_dtype = torch.promote_types(p.q.dtype, torch.float32)

    def heads_pass(hs: slice) -> None:
        part = _Heads(qf, kf, vf, out, hs, layout, _gathered_rows(plan))
        for rows in text_rows:
            part.out[:, :, rows] = attend(part.q[:, :, rows], part.k, part.v, None, scale)[0]
        lse = part.q.new_empty((1, part.count, layout.image_len), dtype=lse_dtype) if shared else None
        for run in plan.runs:
            _local_attention(part, run, masks, scale, lse)
        part.free_buffers()  # the shared keys' scratch must not stack on the gather buffers
        if shared:
            _shared_attention(part, layout, window, p.pool_weight, scale, lse)

    run_all(heads_pass, [slice(h, min(h + chunk, rows)) for h in range(0, rows, chunk)], p.q.device)
    out = out.view(batch, heads, seq, dim)
    return out if p.residual is None else out.add_(p.residual)


def _local_attention(part: _Heads, run: Run, masks: list[Tensor], scale: float, lse: Tensor | None) -> None:
    """The tiles of a run attend to their own image keys; each writes its output rows and,
    where shared keys are merged in later (`lse`), their log-sum-exps."""
    tile = run.first
    if tile.query_span is not None and tile.key_span is not None:
        _batched_run(part, run, None if tile.mask is None else masks[tile.mask], scale, lse)
        return
    q = part.read(0, tile.query_span, tile.queries)
    out = out_lse = None
    for key_part in tile.parts:
        k, v = (part.read(i, key_part.span, key_part.keys) for i in (1, 2))
        result = attend(q, k, v, None if key_part.mask is None else masks[key_part.mask], scale)
        if out is None:
            out, out_lse = result
        else:
            _merge(out, out_lse, *result)
    part.write(tile.query_span, tile.queries, out, lse, out_lse)


def _batched_run(part: _Heads, run: Run, mask: Tensor | None, scale: float, lse: Tensor | None) -> None:
    """All tiles of a run in one kernel call, the tiles stacked as its batch dimension."""
    (q_start, q_stop), (k_start, k_stop) = run.first.query_span, run.first.key_span
    length, count = q_stop - q_start, run.count
    q = part.tiled(0, q_start, length, count, length)
    k, v = (part.tiled(i, k_start, k_stop - k_start, count, length) for i in (1, 2))
    out, out_lse = attend(q, k, v, mask, scale)  # [count, heads, length, (dim)]
    rows = slice(q_start, q_start + count * length)
    part.image[3][0, :, rows].unflatten(1, (count, length)).copy_(out.transpose(0, 1))
    if lse is not None:
        lse[0, :, rows].unflatten(1, (count, length)).copy_(out_lse.transpose(0, 1))


def _shared_attention(
    part: _Heads, layout: TokenLayout, window: Window, pool_weight: Tensor | None, scale: float, lse: Tensor
) -> None:
    """Every image row's attention to the keys all image queries see (text, pooled), merged
    into the tiles' output and log-sum-exps (`lse`, per image row [1, heads, image_len]). One
    key set at a time, over contiguous chunks of image rows."""
    chunks = _row_chunks(0, layout.image_len)
    for k, v in _shared_key_sets(part.k, part.v, layout, window, pool_weight):
        for rows in chunks:
            out, out_lse = attend(part.image[0][:, :, rows], k, v, None, scale)
            _merge(part.image[3][:, :, rows], lse[:, :, rows], out, out_lse)
        del k, v  # a pooled part is freed before the next one is made


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
    if window.pool:
        yield from pooled_parts(k, v, layout, window, pool_weight, POOLED_KEYS)


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
