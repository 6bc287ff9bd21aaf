"""Carrying out a plan: DiTFastAttn with the plan as its schedule, and its step reuse, checked
against the model it runs on when sampling starts (the plan node itself sees no conditioning or latent)."""

from __future__ import annotations

import torch

from ..patching import AttentionCall, CallSite, SamplingRun
from ..patching.ditfastattn import DiTFastAttn
from ..patching.state import executing_node
from .schema import LayerInfo, Plan, PlanError


class PlannedAttention(DiTFastAttn):
    def __init__(self, plan: Plan, backend: str = "auto") -> None:
        super().__init__(plan, backend)
        self.plan = plan
        self.node_id = executing_node()  # the node that made this (Apply Plan, Calibrate): warnings show there too
        # the runtime asks it which steps skip the model (None: the plan reuses no step, nothing is kept for it)
        self.step_reuse = plan.step_reuse_of if plan.reuses_steps else None
        self.caches_blocks = plan.caches_blocks  # the runtime hooks the model's blocks (block_cache.py)

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
        if run.report.forwards <= 1:
            self._check(call, site, run)
        return super().__call__(call, site, run)

    def _check(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> None:
        """Fail the run with a clear message if the plan was calibrated on another model."""
        fingerprint = self.plan.fingerprint
        problem = None
        if run.patch.adapter.name != fingerprint.architecture:
            problem = f"the plan is for a {fingerprint.architecture} model, this model is {run.patch.adapter.name}"
        elif site.layer >= len(fingerprint.layers):
            problem = f"the plan has {len(fingerprint.layers)} attention layers per forward, this model has more"
        elif (found := LayerInfo(site.kind, call.heads, call.head_dim)) != fingerprint.layers[site.layer]:
            problem = (f"attention layer {site.layer} differs: the plan has {fingerprint.layers[site.layer]}, "
                       f"this model has {found}")
        elif run.report.forwards == 1 and run.report.layers_per_forward != {len(fingerprint.layers)}:
            problem = (f"the plan has {len(fingerprint.layers)} attention layers per forward, this model has "
                       f"{sorted(run.report.layers_per_forward)}")
        if problem is not None:
            raise PlanError(f"FastAttn Apply Plan: this plan does not fit the model: {problem}. Calibrate a plan "
                            "for this model (the Calibrate node), or pick the plan made for it.")
        nodes = () if self.node_id is None else (self.node_id,)
        if site.layer == 0 and run.report.forwards == 0 and not self.plan.step_map(site.timeline)[1]:
            calibrated = self.plan.calibration
            scheduler = calibrated.scheduler or "its scheduler not recorded"
            run.warn(f"the plan was calibrated at {calibrated.steps} steps ({scheduler}) and this run samples "
                     f"{site.timeline.steps} steps at other noise levels; each step uses the plan step calibrated at "
                     "the nearest noise level (at the same position in the run if this ComfyUI does not know that "
                     "scheduler); calibrate with this run's steps and scheduler for a plan made for it", nodes)
        grid = self.plan.calibration.grid
        if site.layout is not None and grid and tuple(site.layout.grid) != tuple(grid):
            run.warn(f"the plan was calibrated on a token grid of {_grid(grid)} and this run has "
                     f"{_grid(site.layout.grid)}; its window scales with the grid, but the errors it kept within "
                     "delta were measured at the calibration's size (calibrate at this size for a plan made for it)",
                     nodes)


def _grid(grid: tuple[int, ...]) -> str:
    return " x ".join(str(side) for side in grid)
