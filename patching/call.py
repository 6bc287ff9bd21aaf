"""One call of ComfyUI's attention override, parsed once into what the methods need.

ComfyUI calls the override as `override(func, q, k, v, heads, mask=..., skip_reshape=...,
skip_output_reshape=..., transformer_options=..., **more)`; some models pass `heads` or
`mask` positionally, and newer hosts add keyword arguments (`scale`, `enable_gqa`,
`low_precision_attention`) and may pass q/k/v as tensor containers. `func` is the attention
backend the override replaced: calling it again does not recurse.

A method that recomputes attention itself (a window, a copy) first asks `unreadable()`: an
argument this module cannot honour means the call must run as the host would, in full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

Override = Callable[..., torch.Tensor]

# Keyword arguments whose meaning the methods honour: the layout flags and the mask are read
# here; `scale` is passed to the window kernels; `enable_gqa` expands k/v heads as SDPA does;
# `attn_precision` and `low_precision_attention` only allow a backend less precision than the
# float32 our kernels compute in; `_inside_attn_wrapper` is the host's own recursion guard.
UNDERSTOOD_KWARGS = frozenset({
    "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape", "transformer_options",
    "scale", "enable_gqa", "low_precision_attention", "_inside_attn_wrapper",
})


@dataclass(frozen=True)
class AttentionCall:
    func: Callable[..., torch.Tensor]
    args: tuple
    kwargs: dict[str, Any]
    previous_override: Override | None  # another pack's override, chained

    @property
    def q(self) -> torch.Tensor:
        return self.args[0]

    @property
    def k(self) -> torch.Tensor:
        return self.args[1]

    @property
    def v(self) -> torch.Tensor:
        return self.args[2]

    @property
    def heads(self) -> int:
        return int(self.args[3] if len(self.args) > 3 else self.kwargs["heads"])

    @property
    def mask(self) -> torch.Tensor | None:
        return self.args[4] if len(self.args) > 4 else self.kwargs.get("mask")

    @property
    def skip_reshape(self) -> bool:
        return bool(self.kwargs.get("skip_reshape", False))

    @property
    def skip_output_reshape(self) -> bool:
        return bool(self.kwargs.get("skip_output_reshape", False))

    @property
    def scale(self) -> float | None:
        return self.kwargs.get("scale")

    def unreadable(self) -> str | None:
        """Why this call's tensors cannot be recomputed here (None if they can): q/k/v that are
        not plain tensors (a newer host's containers) or an argument this pack does not know."""
        if not all(type(t) is torch.Tensor for t in self.args[:3]):
            return "q/k/v passed as tensor containers"
        unknown = sorted(set(self.kwargs) - UNDERSTOOD_KWARGS)
        if unknown:
            return f"unknown attention arguments {', '.join(unknown)}"
        return None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1] if self.skip_reshape else self.q.shape[-1] // self.heads

    @property
    def q_len(self) -> int:
        return self.q.shape[2] if self.skip_reshape else self.q.shape[1]

    @property
    def k_len(self) -> int:
        return self.k.shape[2] if self.skip_reshape else self.k.shape[1]

    @property
    def output_shape(self) -> torch.Size:
        """Shape of what `func` returns for this call."""
        if self.skip_output_reshape:
            return torch.Size((self.batch, self.heads, self.q_len, self.head_dim))
        return torch.Size((self.batch, self.q_len, self.heads * self.head_dim))

    def run_default(self) -> torch.Tensor:
        """Full attention exactly as the host would compute it (through a chained override)."""
        if self.previous_override is not None:
            return self.previous_override(self.func, *self.args, **self.kwargs)
        return self.func(*self.args, **self.kwargs)

    def heads_first(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, H, N, D], whatever the model passed (packed [B, N, H*D] or [B, N, H, D]).
        Grouped-query k/v (fewer heads, `enable_gqa`) are repeated to q's heads, as SDPA does."""
        if self.skip_reshape:
            q, k, v = self.q, self.k, self.v
        else:
            q, k, v = (t.reshape(t.shape[0], t.shape[1], -1, self.head_dim).transpose(1, 2)
                       for t in (self.q, self.k, self.v))
        if k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def format_output(self, out: torch.Tensor) -> torch.Tensor:
        """Turn a [B, H, N, D] result into the shape the model expects back from `func`."""
        if self.skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    def output_heads_first(self, out: torch.Tensor) -> torch.Tensor:
        """The inverse of format_output: a result of `func` as [B, H, N, D]."""
        if self.skip_output_reshape:
            return out
        return out.reshape(out.shape[0], out.shape[1], self.heads, -1).transpose(1, 2)

    def dense_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """Full attention of the `heads` (indices) only, as [B, h, N, D], computed by the host's own
        backend with the call's mask and scale: heads are independent, so these rows equal the
        same heads of `run_default()`. (A per-head plan windows the other heads.)"""
        q, k, v = (t[:, heads] for t in self.heads_first())  # grouped k/v already repeated to q's heads
        mask = self.mask
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[1] == self.heads > 1:
            mask = mask[:, heads]  # a mask per head follows its heads
        kwargs = {key: value for key, value in self.kwargs.items() if key not in ("heads", "mask", "enable_gqa")}
        kwargs.update(skip_reshape=True, skip_output_reshape=True)
        extra = self.args[5:]  # positional arguments after the mask, if a model passed any
        return self.func(q, k, v, heads.numel(), mask, *extra, **kwargs)

    def select(self, rows: slice | torch.Tensor) -> AttentionCall:
        """The same call on a slice of the batch (a batch-sized mask is sliced with it)."""
        args = [self.q[rows], self.k[rows], self.v[rows], *self.args[3:]]
        kwargs = dict(self.kwargs)
        mask = self.mask
        if isinstance(mask, torch.Tensor) and mask.ndim > 2 and mask.shape[0] == self.batch:
            if len(args) > 4:
                args[4] = mask[rows]
            else:
                kwargs["mask"] = mask[rows]
        return replace(self, args=tuple(args), kwargs=kwargs)

    def flops(self) -> int:
        """Multiply-adds x 2 of full attention for this call: QK^T and AV."""
        return 4 * self.batch * self.heads * self.q_len * self.k_len * self.head_dim
