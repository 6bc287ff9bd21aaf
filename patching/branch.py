"""Branch-level sharing: a shared attention layer skips its projections, not only its attention call.

On a step-shared (layer, step) the block gets the output of its attention branch after the output
projection, stored at the layer's last computed step, so neither the QKV projections nor the
output projection run; under CFG sharing they run on the conditional rows only and the output is
copied to the unconditional rows. This is what call-level sharing computes (the output projection
is a fixed linear map of the attention output), minus the projections' work.

The adapters map each architecture's projection layers (module paths) to the attention call they
feed. The pack replaces each mapped module's `forward` through a ModelPatcher object patch (undone
by the host when the clone is unloaded); the replacement asks the model call's ForwardPass, found
through `ACTIVE`, for its layer's BranchPlan, and runs the original forward whenever there is none.
Fused layers (FLUX single blocks: `linear1` = QKV + MLP input, `linear2` = attention + MLP output)
skip only the leading features that belong to the attention branch. A layer whose first projection
sees another length than the layout's (tokens the model adds inside its forward: reference images,
padding) runs as the host runs it, as its attention call then does.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.ops
import torch
import torch.nn.functional as F

from .adapters import Projection
from .cache import store_chunks
from .site import BranchPlan
from .state import ACTIVE, SamplingRun


def projection_forward(projection: Projection, original: Callable) -> Callable:
    """The replacement `forward` of one mapped projection module."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = ACTIVE.get()
        tokens = x.shape[1] if x.dim() == 3 else -1  # [batch, tokens, features], as every mapped layer takes
        plan = active.plan(projection, tokens) if active is not None and not args and not kwargs else None
        if plan is None or not plan.acts_on(projection.role):
            return original(x, *args, **kwargs)
        run = active.run
        if projection.role == "qkv":
            return _qkv(original, x, projection, plan, run)
        return _output(original, x, projection, plan, run)

    forward.fastattn_original = original
    return forward


def _computed_rows(plan: BranchPlan, batch: int) -> list[int]:
    """Batch rows whose branch is computed: all but the chunks CFG sharing copies (none when skipped)."""
    if plan.skip:
        return []
    size = batch // len(plan.chunk_ids)
    return [row for chunk in range(len(plan.chunk_ids)) if chunk not in plan.sources
            for row in range(chunk * size, (chunk + 1) * size)]


def _qkv(original: Callable, x: torch.Tensor, projection: Projection, plan: BranchPlan,
         run: SamplingRun) -> torch.Tensor:
    """Q/K/V features of the computed rows only; zeros elsewhere (the attention call never reads them)."""
    module = original.__self__
    rows = _computed_rows(plan, x.shape[0])
    branch = projection.branch_features or module.out_features
    out = x.new_zeros(*x.shape[:-1], module.out_features)
    if projection.branch_features is None:
        if rows:
            out[rows] = original(x[rows])
    else:
        weight, bias, stream = comfy.ops.cast_bias_weight(module, x, offloadable=True)
        out[..., branch:] = F.linear(x, weight[branch:], None if bias is None else bias[branch:])
        if rows:
            out[rows, ..., :branch] = F.linear(x[rows], weight[:branch], None if bias is None else bias[:branch])
        comfy.ops.uncast_bias_weight(module, weight, bias, stream)
    _count_saved(run, x, module.in_features, branch, x.shape[0] - len(rows))
    return out


def _output(original: Callable, z: torch.Tensor, projection: Projection, plan: BranchPlan,
            run: SamplingRun) -> torch.Tensor:
    """The branch's projected output (stored, or computed on the computed rows and copied), plus the
    projection of the non-branch inputs of a fused layer."""
    module = original.__self__
    width = projection.branch_features
    weight = bias = stream = None
    if width is not None:
        weight, bias, stream = comfy.ops.cast_bias_weight(module, z, offloadable=True)
    if plan.skip:
        branch = plan.cached[projection.path]
        if branch.shape[:-1] != z.shape[:-1]:
            raise RuntimeError(f"FastAttn: the stored output of {projection.path} has shape {tuple(branch.shape)}, "
                               f"this forward needs {tuple(z.shape[:-1])}. Please report this with your workflow.")
        branch = branch.to(z.dtype)
        rows = []
    else:
        rows = _computed_rows(plan, z.shape[0])
        part = z[rows] if len(rows) < z.shape[0] else z
        computed = original(part) if width is None else F.linear(part[..., :width], weight[:, :width])
        branch = _with_copies(computed, plan, z.shape[0])
        if plan.store:
            store_chunks(run, ("branch", plan.layer, projection.path), plan.chunk_ids, plan.step, branch,
                         plan.made_for)
    _count_saved(run, z, width or module.in_features, module.out_features, z.shape[0] - len(rows))
    if width is None:
        return branch
    out = branch + F.linear(z[..., width:], weight[:, width:], bias)
    comfy.ops.uncast_bias_weight(module, weight, bias, stream)
    return out


def _with_copies(computed: torch.Tensor, plan: BranchPlan, batch: int) -> torch.Tensor:
    """The computed chunks' rows with each copied chunk filled from its source chunk."""
    if not plan.sources:
        return computed
    chunks = len(plan.chunk_ids)
    kept = [chunk for chunk in range(chunks) if chunk not in plan.sources]
    parts = dict(zip(kept, computed.chunk(len(kept)), strict=True))
    return torch.cat([parts[plan.sources.get(chunk, chunk)] for chunk in range(chunks)])


def _count_saved(run: SamplingRun, x: torch.Tensor, in_features: int, out_features: int, rows_skipped: int) -> None:
    tokens = x[0, ..., 0].numel() if x.dim() > 1 else 1
    run.report.projection_flops_saved += 2 * rows_skipped * tokens * in_features * out_features
