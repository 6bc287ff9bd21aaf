"""Calibration: one sampling run that decides, step by step, which technique each attention
layer uses, and continues on the compressed trajectory it chose.

An APPLY_MODEL wrapper, placed outside the runtime's own, sees each model call of the run.
At the first call of a step it runs the diffusion model several times (each a forward of
its own for the runtime, with DiTFastAttn carrying out a trial assignment and the run's
caches restored between trials), decides the step, and returns the output of the decided
assignment, so the next step starts where applying the plan would.

    greedy  the paper's search: layers in forward order, candidates AST, WA-RS+ASC, WA-RS,
            full+ASC; the first whose model-output loss is within (i+1)/L x delta is kept.
    fast    one scoring forward (full attention everywhere) scores each layer's candidates
            against its full output; the cheapest under delta is kept per layer; one forward
            checks the step's model output; where it fails, the riskier half of the choices
            (largest local error) fall back to full attention and the check runs again (twice
            at most, then the whole step is full).
            Per head (optional): where windowing the whole layer errs too much, the window may
            still apply to the heads whose own error is within delta, the others computing
            full attention (the layer's error as a whole staying within delta too).
    budget  one sampling run with full attention measures every candidate's local error at every
            (step, layer): window + residual at several window sizes with residuals 1..AGES steps
            old, step sharing of outputs 1..AGES steps old, CFG sharing; then search.py allocates
            the error budget (delta squared per cell, summed) across all steps and layers at once,
            at the least cost (measured time, or FLOPs). A second run samples with the plan (the
            latent Calibrate returns), and its final latent is checked against the first run's (full
            attention, same noise): 2.5-4 baseline runs in BENCHMARKS.md, the probes included.
            With step reuse, each step also keeps the model's prediction (what skipping a later step
            reuses or forecasts from) and runs one more forward with every layer step-shared: how much
            the model output errs for the layers' summed local error (the rate that puts a skipped
            step's error into the cells' units) and, timed, what the rest of a forward costs.
            With block caching, each block's change is scored against its earlier changes
            (scorer.py), its linear layers' FLOPs counted once, and one more forward per step
            skips every cacheable block: its output error per summed block error, over step sharing's
            rate, puts the blocks' errors into the cells' units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils
import torch

from ..patching import AttentionCall, CallSite, SamplingRun, block_cache, install
from ..patching.block_cache import BlockCall
from ..patching.ditfastattn import DiTFastAttn
from ..patching.runtime import PATCH_KEY, RUN_KEY, apply_model_wrapper
from ..patching.schedule import Choice, WindowSize
from ..patching.state import OTHER, ForwardPass
from ..patching.step_reuse import forecast, noise_estimate
from ..patching.timeline import Timeline
from .apply import PlannedAttention
from .costs import COST_MEASURES, LayerSlot, LinearFlops, layer_slot, synchronize
from .prompts import prompt_rows
from .schema import (
    BLOCK,
    CANDIDATES,
    WINDOWED_KINDS,
    CalibrationInfo,
    Fingerprint,
    HeadSet,
    Plan,
    choice_of,
)
from .scorer import BlockScorer, Scorer, guided, relative_squared_error
from .search import RUN_CORRELATION, Candidate, StepReuse, allocate

log = logging.getLogger(__name__)
CALIBRATION_KEY = "fastattn_calibration"
MODES = ("greedy", "fast", "budget")
FAST_RETRIES = 2  # fast mode: checks after the first, each with the riskier half of the choices back to full
AGES = 4  # budget mode: the oldest residual / shared output a candidate reads, in steps
WINDOW_SCALES = (0.25, 0.5, 1.0, 2.0)  # budget mode: the window sizes tried, as multiples of the window fraction


@dataclass(frozen=True)
class Settings:
    delta: float  # error threshold: model-output loss (greedy: grows with depth), local error (fast)
    candidates: tuple[str, ...] = CANDIDATES  # kept in the paper's order
    window: WindowSize = WindowSize()
    mode: str = "greedy"
    per_head: bool = False  # fast mode: window techniques may apply to some heads of a layer only
    cost: str = "flops"  # budget mode: what a candidate costs, "time" (measured here) or "flops"
    step_reuse: bool = False  # budget mode: whole steps may be skipped, their prediction reused or forecast
    block_cache: bool = False  # budget mode: a block may be skipped, its last change reused (block_cache.py)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"search mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.cost not in COST_MEASURES:
            raise ValueError(f"cost must be one of {', '.join(COST_MEASURES)}, got {self.cost!r}")
        if self.per_head and self.mode != "fast":
            raise ValueError("per-head choices need search_mode fast: greedy search would run one model forward "
                             "per head, per layer, per step (hundreds of times a baseline run), and budget search "
                             "chooses for whole layers; switch per_head off "
                             "or use fast")
        if self.step_reuse and self.mode != "budget":
            raise ValueError("step reuse is planned by the budget search only (it weighs a skipped step against "
                             "every layer's choices); set search_mode to budget or switch step reuse off")
        if self.block_cache and self.mode != "budget":
            raise ValueError("block caching is planned by the budget search only (it weighs a skipped block against "
                             "its layer's other choices); set search_mode to budget or switch block_cache off")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        unknown = set(self.candidates) - set(CANDIDATES)
        if unknown:
            raise ValueError(f"unknown candidate techniques {sorted(unknown)}; known: {', '.join(CANDIDATES)}")

    @property
    def windows(self) -> tuple[WindowSize, ...]:
        """The window sizes searched: the window alone, or in budget mode around it."""
        if self.mode != "budget":
            return (self.window,)
        fractions = sorted({min(1.0, self.window.fraction * scale) for scale in WINDOW_SCALES})
        return tuple(dataclasses.replace(self.window, fraction=fraction) for fraction in fractions)


def output_loss(compressed: torch.Tensor, reference: torch.Tensor) -> float:
    """The paper's loss: mean of clip(|a - b| / (max(|a|, |b|) + 1e-6), 0, 10)."""
    a, b = compressed.double(), reference.double()
    return ((a - b).abs() / (torch.maximum(a.abs(), b.abs()) + 1e-6)).clamp(0, 10).mean().item()


class TrialSchedule:
    """What DiTFastAttn consults while calibrating: the assignment being tried at the current
    step. Asked about the next step, it answers "reuse" so every output is kept for a possible
    AST; every full step caches the residual for a possible WA-RS."""

    def __init__(self, window: WindowSize, caches_residual: bool, shares_cfg: bool) -> None:
        self.window = window
        self.caches_residual = caches_residual
        self.shares_cfg = shares_cfg
        self.step = -1
        self.assignment: dict[int, str] = {}
        self.heads: dict[int, HeadSet] = {}  # per-head window cells of the assignment

    def choose(self, step: int, timeline: Timeline, layer: int) -> Choice:
        if step != self.step:
            return Choice("reuse")
        return choice_of(self.assignment.get(layer, "full"), self.window, self.heads.get(layer))

    def residual_window(self, step: int, timeline: Timeline, layer: int) -> WindowSize | None:
        return self.window if self.caches_residual else None


class CalibrationMethod:
    """The attention method of the calibration run: DiTFastAttn with the trial schedule, which
    also records each layer's costs (first forward) and, in a scoring forward, scores it."""

    windows = True  # its trials window: a model without an adapter has its token order proven first

    def __init__(self, calibration: Calibration) -> None:
        self.calibration = calibration
        self.ditfastattn = DiTFastAttn(calibration.schedule)
        self.caches_blocks = calibration.settings.block_cache  # the runtime hooks the blocks: they are measured

    def run_block(self, call: BlockCall, forward: ForwardPass) -> object:
        """Budget mode with block caching: in the scoring forward, each block's change is scored against
        its changes of earlier steps (BlockScorer), and what its work besides attention costs is counted once."""
        calibration = self.calibration
        layer = forward.layers
        if calibration.skipping_blocks and layer in calibration.cacheable_blocks():
            result = block_cache.reused(call, forward)
            if result is not None:
                return result
        if not calibration.scoring:
            return block_cache.computed(call, forward, changes=False)[0]
        counted = layer not in calibration.block_flops
        with LinearFlops() if counted else contextlib.nullcontext() as counter:
            result, changes = block_cache.computed(call, forward, changes=True)
        if counted:
            calibration.block_flops[layer] = counter.flops
        calibration.block_layers[layer] = forward.run.blocks[call.block.path].layers if changes else 0
        calibration.block_scorer.score(forward.step, layer, changes, forward.halves, forward.chunk_ids)
        block_cache.store(forward, call.block, changes)  # what the next step's forward skipping blocks adds
        return result

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
        out, flops, technique = self.ditfastattn(call, site, run)
        self.calibration.observe(call, site, run, out)
        return out, flops, technique

    def finish_run(self, run: SamplingRun) -> None:
        self.ditfastattn.finish_run(run)


class Calibration:
    """The state of one calibration run: decided steps, losses, layer costs, progress."""

    def __init__(self, settings: Settings, steps: int, parameters: int = 0, cfg: float | None = None) -> None:
        self.settings = settings
        self.steps = steps
        self.parameters = parameters  # the model's (step reuse priced in FLOPs: 2 per parameter and token)
        caches_residual = any(name.startswith("wars") for name in settings.candidates)
        shares_cfg = any(name.endswith("+asc") for name in settings.candidates)
        self.schedule = TrialSchedule(settings.window, caches_residual, shares_cfg)
        ages = AGES if settings.mode == "budget" else None
        self.cfg = cfg  # the sampler's CFG scale: budget mode scores errors on the guided prediction
        self.scorer = Scorer(settings.windows, settings.candidates, ages, cfg) if settings.mode != "greedy" else None
        self.local_errors: list[dict[int, dict[Candidate, float]]] = []  # budget: [step][layer] -> candidate's error
        # budget with block caching: each block's change scored per step, by its first layer; the FLOPs of its
        # linear layers (what skipping it saves besides attention) and the attention calls it makes
        self.block_scorer = BlockScorer(AGES, cfg)
        self.block_flops: dict[int, int] = {}
        self.block_layers: dict[int, int] = {}
        # budget with step reuse: each step's prediction (noise estimate, sigma), the output error per summed
        # local error (all layers step-shared), and the seconds of such forwards (the rest of a forward)
        self.predictions: dict[int, tuple[torch.Tensor, float]] = {}
        self.gains: dict[int, float] = {}
        self.block_gains: dict[int, float] = {}  # block caching: output error per summed block error (age 1)
        self.skipping_blocks = False  # in the forward that skips every cacheable block
        self.rest_seconds: list[float] = []
        self.tokens = 0  # batch x tokens of the first compressible attention call
        self.step_reuse: list[str | None] = []
        self.scoring = False
        self.architecture = ""
        self.timeline: Timeline | None = None  # the calibration run's steps as noise levels
        self.grid: tuple[int, ...] = ()  # the image token grid, as the runtime placed it
        self.layers: list[LayerSlot] = []
        self.methods: list[list[str]] = []
        self.heads: list[list[list[int] | None]] = []
        self.losses: list[list[float | None]] = []
        self.step_losses: list[float] = []
        self.progress = comfy.utils.ProgressBar(steps)
        # steps whose CFG halves the host ran as separate model calls (short of free memory): budget mode scores
        # the second call joined with the first (scorer.py); greedy and fast decide on the first call alone
        self.split_steps: list[int] = []
        self.scored_halves: set[int] = set()  # the batch chunks' roles scored at the step measured last

    def observe(self, call: AttentionCall, site: CallSite, run: SamplingRun, out: torch.Tensor) -> None:
        if site.layer == len(self.layers) and not self.methods:
            self.architecture = run.patch.adapter.name
            self.timeline = run.timeline
            self.grid = self.grid or (tuple(site.layout.grid) if site.layout is not None else ())
            self.layers.append(self._slot(call, site))
            if self.layers[-1].compressible and not self.tokens:
                self.tokens = call.batch * call.q_len
        if self.scoring and site.layer < len(self.layers) and self.layers[site.layer].compressible:
            self.scorer.score(call, site, out)

    def _slot(self, call: AttentionCall, site: CallSite) -> LayerSlot:
        compressible = (site.kind in WINDOWED_KINDS and site.layout is not None and site.layout_unproven is None
                        and call.mask is None)
        measure = self.settings.cost if self.settings.mode == "budget" else "flops"
        return layer_slot(call, site, compressible, self.settings.windows, measure)

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options=None, **kwargs):
        run: SamplingRun = transformer_options[RUN_KEY]
        step = run.timeline.step_of(float(transformer_options.get("sigmas", t).flatten()[0]))

        def forward(assignment: dict[int, str], state: tuple[dict, dict] | None,
                    heads: dict[int, HeadSet] | None = None) -> torch.Tensor:
            """One forward with `assignment` at this step, from the run's state `state` (a trial:
            the same evaluation of the step, from the same caches) or from where the run is."""
            comfy.model_management.throw_exception_if_processing_interrupted()
            if state is not None:
                run.restore(state)
            self.schedule.step, self.schedule.assignment, self.schedule.heads = step, assignment, heads or {}
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        while len(self.methods) < step:  # a step the sampler never evaluated: nothing was compressed
            self._record_full()
        halves = tuple(transformer_options.get("cond_or_uncond", ()))
        has_cfg = 0 in halves and 1 in halves
        if step < len(self.methods):  # a later call of a decided step (other CFG half, second evaluation)
            if self.settings.mode == "budget" and step == len(self.methods) - 1 and set(halves) - self.scored_halves:
                return self._measure_more(step, has_cfg, halves, forward)
            return forward(dict(enumerate(self.methods[step])), None, dict(enumerate(self.heads[step])))
        if not has_cfg and self.cfg not in (None, 1.0) and len(set(halves)) == 1:
            self.split_steps.append(step)
        if self.settings.mode == "budget":
            roles = tuple(OTHER if run.roles is None else run.roles.get(index, OTHER) for index in halves)
            out = self._measure(step, has_cfg, halves, run, forward, x, t, roles)
        else:
            out = {"greedy": self._greedy, "fast": self._fast}[self.settings.mode](step, has_cfg, run, forward)
        self.progress.update_absolute(step + 1)
        return out

    def _candidates(self, layer: int, has_cfg: bool) -> list[str]:
        if not self.layers[layer].compressible:
            return []
        return [name for name in self.settings.candidates if has_cfg or not name.endswith("+asc")]

    def _greedy(self, step: int, has_cfg: bool, run: SamplingRun, forward: Callable) -> torch.Tensor:
        before = run.snapshot()
        reference = forward({}, before)
        after_full = run.snapshot()
        count = len(self.layers)
        assignment: dict[int, str] = {}
        losses: list[float | None] = [None] * count
        if step > 0 and self.settings.delta > 0:
            for layer in range(count):
                budget = (layer + 1) / count * self.settings.delta
                for name in self._candidates(layer, has_cfg):
                    loss = output_loss(forward({**assignment, layer: name}, before), reference)
                    if loss <= budget:
                        assignment[layer], losses[layer] = name, loss
                        break
                self.progress.update_absolute(step + (layer + 1) / count)
        out = forward(assignment, before) if assignment else reference
        if not assignment:
            run.restore(after_full)
        self._record([assignment.get(layer, "full") for layer in range(count)], losses, output_loss(out, reference))
        return out

    def _fast(self, step: int, has_cfg: bool, run: SamplingRun, forward: Callable) -> torch.Tensor:
        before = run.snapshot()
        self.scoring = True
        try:
            reference = forward({}, before)
        finally:
            self.scoring = False
        after_full = run.snapshot()
        count = len(self.layers)
        assignment: dict[int, str] = {}
        heads: dict[int, HeadSet] = {}
        losses: list[float | None] = [None] * count
        if step > 0 and self.settings.delta > 0:
            for layer in list(self.scorer.squared_errors):
                fits = self.scorer.options(layer, self._candidates(layer, has_cfg), self.settings.delta,
                                           self.settings.per_head)
                if fits:
                    name, heads[layer], losses[layer] = min(fits, key=lambda fit: self.layers[layer].cost(*fit[:2]))
                    assignment[layer] = name

        def check(kept: dict[int, str]) -> tuple[float, torch.Tensor]:
            out = forward(kept, before, heads)  # a layer left out of `kept` is full: its heads are not read
            return output_loss(out, reference), out

        errors = {layer: losses[layer] for layer in assignment}
        assignment, loss, out = passing_choices(assignment, errors, check, self.settings.delta)
        if not assignment:  # full attention: the scoring forward's output and caches
            out, loss = reference, 0.0
            run.restore(after_full)
        heads = {layer: heads.get(layer) for layer in assignment}
        losses = [losses[layer] if layer in assignment else None for layer in range(count)]
        self.scorer.commit(assignment, heads)
        self._record([assignment.get(layer, "full") for layer in range(count)], losses, loss,
                     [_listed(heads.get(layer)) for layer in range(count)])
        return out

    def _measure(self, step: int, has_cfg: bool, halves: tuple[int, ...], run: SamplingRun, forward: Callable,
                 x: torch.Tensor, sigma: torch.Tensor, roles: tuple[int, ...]) -> torch.Tensor:
        """Budget mode: full attention, every candidate scored; the plan is searched after the run."""
        rated = (self.settings.step_reuse or self.settings.block_cache) and bool((sigma > 0).all())
        shared = skipped = None
        if rated and step > 0:  # every layer step-shared: the output error it makes, and its time
            before = run.snapshot()
            start = time.perf_counter()
            shared = forward({layer: "ast" for layer, slot in enumerate(self.layers) if slot.compressible}, before)
            synchronize(x.device)
            self.rest_seconds.append(time.perf_counter() - start)
            run.restore(before)
            if self.settings.block_cache and self.cacheable_blocks():  # every cacheable block skipped
                self.skipping_blocks = True
                try:
                    skipped = forward({}, before)
                finally:
                    self.skipping_blocks = False
                run.restore(before)
        self.scoring = True
        try:
            out = forward({}, None)
        finally:
            self.scoring = False
        self.scored_halves = set()
        self._add_scores(step, has_cfg, halves)
        self._record_full()
        if rated:
            def prediction(output: torch.Tensor) -> torch.Tensor:  # as the sampler uses it: CFG applied
                estimate = noise_estimate(x, output, sigma)
                combined = guided(estimate, roles, self.cfg)
                return estimate if combined is None else combined

            estimate = prediction(out)
            if self.settings.step_reuse:
                self.predictions[step] = estimate, float(sigma.flatten()[0])
            for gains, made, key in ((self.gains, shared, ("ast", 0.0, 1)), (self.block_gains, skipped, (BLOCK, 0.0, 1))):
                gain = _gain(None if made is None else prediction(made), estimate,
                             [errors.get(key, 0.0) for errors in self.local_errors[step].values()])
                if gain is not None:
                    gains[step] = gain
        return out

    def _measure_more(self, step: int, has_cfg: bool, halves: tuple[int, ...], forward: Callable) -> torch.Tensor:
        """Budget mode: a later call of the step measured last, for chunks not scored yet (the other CFG half,
        run apart), scored too; it samples with full attention, as the step was recorded."""
        self.scoring = True
        try:
            out = forward({}, None)
        finally:
            self.scoring = False
        self._add_scores(step, has_cfg, halves)
        return out

    def _add_scores(self, step: int, has_cfg: bool, halves: tuple[int, ...]) -> None:
        """The step's local errors: this scoring forward's (a later call of the step, the other CFG half, is
        scored joined with the first: its errors are the whole batch's)."""
        found = {layer: {key: error for key, error in self.scorer.relative_errors(layer).items()
                         if has_cfg or not key[0].endswith("+asc")}
                 for layer in self.scorer.squared_errors if step > 0}
        for layer in self.cacheable_blocks():
            if layer in found:
                found[layer].update({(BLOCK, 0.0, age): error for age, error in self.block_scorer.errors.get(layer, {}).items()})
        self.scorer.commit({}, {})
        self.scored_halves.update(halves)
        while len(self.local_errors) <= step:  # steps the sampler never evaluated: nothing measured there
            self.local_errors.append({})
        self.local_errors[step] = found

    def _block_errors_in_cell_units(self) -> None:
        """A block cell's error scaled by how much more (or less) the model output errs per unit of summed
        block error than per unit of summed attention error, at steps where both rates were measured (each
        is one forward with every block skipped, or every layer step-shared)."""
        for step, errors in enumerate(self.local_errors):
            block_gain, gain = self.block_gains.get(step), self.gains.get(step)
            if block_gain is None or not gain:
                continue
            for options in errors.values():
                for key in [key for key in options if key[0] == BLOCK]:
                    options[key] *= block_gain / gain

    def cacheable_blocks(self) -> list[int]:
        """The first layers of the blocks block caching may skip: blocks whose only compressible attention
        layer is their first (a cell decides for one layer; a block skipped skips all of its layers)."""
        return [first for first, count in self.block_layers.items()
                if count and self.layers[first].compressible
                and not any(slot.compressible for slot in self.layers[first + 1:first + count])]

    def _block_savings(self) -> list[LayerSlot]:
        """The layer slots, each beginning a cacheable block priced with what skipping the block saves
        besides its attention: its linear layers' FLOPs, or in time those FLOPs at the layer's attention
        seconds per FLOP (the linear layers are not timed apart; a stated approximation)."""
        slots = list(self.layers)
        for first in self.cacheable_blocks():
            slot = slots[first]
            per_flop = slot.prices.full / slot.full_flops if slot.full_flops else 0.0
            slots[first] = dataclasses.replace(slot, block_saving=self.block_flops.get(first, 0) * per_flop)
        return slots

    def _step_reuse(self) -> StepReuse:
        """Each skipped step's error (reusing or forecasting from the steps the walk may compute), in the
        cells' units (divided by the step's gain), and what skipping saves besides attention."""
        errors: dict[tuple[int, int, int], float] = {}
        for step, gain in self.gains.items():
            exact, sigma = self.predictions[step]
            for last in range(max(0, step - AGES), step):
                if last not in self.predictions or self.predictions[last][0].shape != exact.shape:
                    continue
                errors[(step, last, -1)] = relative_squared_error(self.predictions[last][0], exact) / gain
                for before in range(max(0, last - AGES), last):
                    if before in self.predictions and self.predictions[before][0].shape == exact.shape:
                        (newer, at_last), (older, at_before) = self.predictions[last], self.predictions[before]
                        guess = forecast(newer, older, (at_last, at_before), sigma)
                        errors[(step, last, before)] = relative_squared_error(guess, exact) / gain
        compressible = [slot for slot in self.layers if slot.compressible]
        full = sum(slot.price("full") for slot in compressible) / max(1, len(compressible))
        if self.settings.cost == "time":
            rest = statistics.median(self.rest_seconds) if self.rest_seconds else 0.0
        else:
            rest = 2.0 * self.parameters * self.tokens
        return StepReuse(errors, rest / full if full else 0.0)

    def _record(self, methods: list[str], losses: list[float | None], step_loss: float,
                heads: list[list[int] | None] | None = None) -> None:
        self.methods.append(methods)
        self.losses.append(losses)
        self.step_losses.append(step_loss)
        self.heads.append(heads or [None] * len(methods))

    def _record_full(self) -> None:
        self._record(["full"] * len(self.layers), [None] * len(self.layers), 0.0)

    def plan(self, info: CalibrationInfo) -> Plan:
        if not self.methods:
            raise RuntimeError("FastAttn Calibrate: the sampler never called the model; nothing was calibrated.")
        while len(self.methods) < self.steps:
            self._record_full()
        fingerprint = Fingerprint(self.architecture, tuple(slot.info for slot in self.layers))
        heads = self.heads if any(cell is not None for row in self.heads for cell in row) else []
        windows = []
        if self.settings.mode == "budget":
            windows = self._search()
        plan = Plan(fingerprint, info, self.settings.window, self.methods, self.losses, self.step_losses, heads=heads,
                    windows=windows, step_reuse=self.step_reuse)
        plan.flops_kept = flops_kept(plan, self.layers, self.timeline)
        return plan


    def _search(self) -> list[list[float | None]]:
        """Budget mode: the cells of the whole run at once (search.py); fills methods and losses,
        returns the window fraction of each cell (None where it is the plan's window or no window)."""
        while len(self.local_errors) < self.steps:  # steps the sampler never evaluated: nothing to compress
            self.local_errors.append({})
        measured = sum(len(step) for step in self.local_errors)
        reuse = self._step_reuse() if self.settings.step_reuse else None
        if self.settings.block_cache:
            self.layers = self._block_savings()
            self._block_errors_in_cell_units()
        allocation = allocate(self.local_errors, self.layers, self.settings.delta ** 2 * measured, AGES, reuse,
                              RUN_CORRELATION)
        cells = allocation.cells
        self.methods = [[cell.technique for cell in row] for row in cells]
        self.losses = [[math.sqrt(cell.error) if cell.technique != "full" else None for cell in row] for row in cells]
        self.step_losses = [math.sqrt(sum(cell.error for cell in row) + reused)
                            for row, reused in zip(cells, allocation.reuse_errors, strict=True)]
        self.step_reuse = allocation.step_reuse if any(allocation.step_reuse) else []
        windows = [[None if cell.fraction in (None, self.settings.window.fraction) else cell.fraction for cell in row]
                   for row in cells]
        return windows if any(fraction is not None for row in windows for fraction in row) else []


def _gain(made: torch.Tensor | None, exact: torch.Tensor, local_errors: list[float]) -> float | None:
    """How much the prediction errs per unit of the summed local errors of the cells that `made` it
    (None where it was not made or they sum to nothing)."""
    summed = sum(local_errors)
    if made is None or summed <= 0:
        return None
    return relative_squared_error(made, exact) / summed


def passing_choices(assignment: dict[int, str], errors: dict[int, float],
                    check: Callable[[dict[int, str]], tuple[float, torch.Tensor]], delta: float
                    ) -> tuple[dict[int, str], float, torch.Tensor | None]:
    """Fast mode's check of a step: the choices (layer -> technique) as they are if the model
    output they give is within delta, else with the riskier half (largest local `errors`) back
    to full attention, checked again, FAST_RETRIES times at most; {} where none passes.
    Returns the choices kept, their check loss and the output of that check."""
    for _ in range(1 + FAST_RETRIES):
        if not assignment:
            break
        loss, out = check(assignment)
        if loss <= delta:
            return assignment, loss, out
        riskiest = sorted(assignment, key=lambda layer: errors[layer], reverse=True)
        assignment = {layer: assignment[layer] for layer in riskiest[max(1, len(riskiest) // 2):]}
    return {}, 0.0, None


def flops_kept(plan: Plan, layers: list[LayerSlot], timeline: Timeline) -> float:
    """Attention FLOPs the plan computes / full attention's, over the calibration run's `timeline`
    (a full step that caches a residual also pays for the window)."""
    computed = full = 0.0
    for step, row in enumerate(plan.methods):
        if plan.step_reuse and plan.step_reuse[step] is not None:  # a skipped step computes no attention
            full += sum(slot.full_flops for slot in layers)
            continue
        for layer, (name, slot) in enumerate(zip(row, layers, strict=True)):
            full += slot.full_flops
            computed += slot.cost(name, plan.heads_of(step, layer), plan.window_of(step, layer).fraction)
            cached = plan.residual_window(step, timeline, layer) if name.startswith("full") else None
            if cached is not None:
                computed += slot.cost("wars+asc" if name.endswith("+asc") else "wars", None, cached.fraction)
    return computed / full if full else 1.0


def _listed(heads: HeadSet) -> list[int] | None:
    return None if heads is None else list(heads)


def _own_sigmas(run: Timeline | None, scheduler: str, steps: int, sampler: str) -> tuple[float, ...]:
    """The calibration run's noise levels where KSampler's schedule of `steps` would not rebuild them (denoise
    below 1, custom sigmas), for the plan to map other runs onto; () where it would."""
    if run is None:
        return ()
    rebuilt = Timeline.ksampler(run.model_sampling, scheduler, steps, sampler)
    return () if rebuilt is not None and rebuilt.same_levels(run) else run.sigmas


def calibrate(model, positive: list, negative: list, latent: dict, *, seed: int, steps: int, cfg: float,
              sampler: str, scheduler: str, settings: Settings,
              denoise: float = 1.0) -> tuple[Plan, torch.Tensor, list[LayerSlot]]:
    """Sample once while calibrating; returns the plan, the run's final latent and each layer's
    slot (its prices, for costs.cost_table)."""
    batch = latent["samples"].shape[0]
    for name, conditioning in (("positive", positive), ("negative", negative)):
        if batch % (rows := prompt_rows(conditioning)):  # the host would cycle or cut the prompts silently
            raise ValueError(f"FastAttn Calibrate: {name} holds {rows} prompts (a prompt batch) and the latent batch "
                             f"is {batch}; give a latent batch that is a multiple of {rows} (the empty latent's "
                             "batch_size), so that every prompt gets its rows")
    calibration = Calibration(settings, steps, sum(p.numel() for p in model.model.diffusion_model.parameters()), cfg)
    patched = install(model, CalibrationMethod(calibration))
    # Outside the runtime's APPLY_MODEL wrapper, so that every trial is a forward of its own.
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    patched.remove_wrappers_with_key(apply_model, PATCH_KEY)
    patched.add_wrapper_with_key(apply_model, CALIBRATION_KEY, calibration.apply_model_wrapper)
    patched.add_wrapper_with_key(apply_model, PATCH_KEY, apply_model_wrapper)
    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    samples = comfy.sample.sample(patched, noise, steps, cfg, sampler, scheduler, positive, negative, latent_image,
                                  noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed, denoise=denoise)
    if calibration.split_steps and settings.mode != "budget":
        log.warning("FastAttn Calibrate: ComfyUI ran the conditional and unconditional halves as separate model calls "
                    "at steps %s (free memory was short of one batched call): %s search decided those steps on the "
                    "first call's half of the batch alone. Free memory (a smaller latent batch, fewer models loaded) "
                    "and calibrate again, or use search_mode budget, which measures both calls.",
                    calibration.split_steps, settings.mode)
    info = CalibrationInfo(steps, sampler, scheduler, cfg, calibration.grid, latent_image.shape[0], seed, settings.delta,
                           settings.mode, _own_sigmas(calibration.timeline, scheduler, steps, sampler))
    plan = calibration.plan(info)
    if settings.mode == "budget":  # the run measured with full attention: sample again, with the plan
        full = samples
        samples = comfy.sample.sample(install(model, PlannedAttention(plan)), noise, steps, cfg, sampler, scheduler,
                                      positive, negative, latent_image, noise_mask=latent.get("noise_mask"),
                                      disable_pbar=True, seed=seed, denoise=denoise)
        plan.check_error = relative_squared_error(samples, full)
    return plan, samples, calibration.layers
