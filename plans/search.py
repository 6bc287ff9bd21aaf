"""The budget search: the technique of every (step, layer) chosen at once, not step by step.

Input: each candidate's local error at each (step, layer), measured in one sampling run with full
attention (relative squared error of the layer's attention output against its full output; for a cell
reading what a step kept two or more steps before, as it adds to the run of such cells, `in_runs`), and
each candidate's price (plans/costs.py). A candidate is (technique, window fraction, age): step
sharing reusing the output computed `age` steps earlier, window + residual with a window of that
fraction and the residual cached `age` steps earlier (at the layer's last full step), either with
CFG sharing, full + CFG sharing, and (optionally) block caching: the layer's whole block skipped,
its change reused from the block's last run `age` steps earlier (a price below zero: the block's work
besides attention is saved too).

For a weight lambda, each layer's sequence of choices minimising  price / full price + lambda x
error, summed over the steps, is found exactly by dynamic programming over the layer's state
(steps since its last full step, since its last computed step, since its block last ran, and the window
its residual was cached for: one window per residual, paid for once at the full step). Lambda is bisected to the
cheapest plan whose summed error stays within the budget. Layers are independent for a given
lambda (their errors add), so the allocation is a Lagrangian relaxation of the knapsack over all
(step, layer) cells: error goes where it buys the most time, early or late, in whichever layer.

Step reuse (optional) skips a whole step: no layer computes, and the model's prediction comes from
earlier steps (patching/step_reuse.py). It couples the layers, so for each lambda the search first
solves the layers alone, then walks the steps and skips a step where its own error (in the same
units as the cells', StepReuse) weighs less than what the step would cost and err with the layers'
choices, and solves the layers again with those steps skipped (their ages growing over them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .costs import LayerSlot
from .schema import BLOCK

Candidate = tuple[str, float, int]  # (technique, window fraction (0 where none), age in steps (0 where none))
# how alike the errors of one run of reusing cells point (BENCHMARKS.md, demo model: 0.4 - 0.6 in runs of window
# + residual, 0.2 - 0.9 in runs of step sharing)
RUN_CORRELATION = 0.5
REUSING = ("wars", "wars+asc", "ast", BLOCK)  # the techniques whose cells read what an earlier step kept
BISECTIONS = 30
WEIGHTS = (1e-4, 1e8)  # the lambda range searched (prices are relative to full attention's)


@dataclass(frozen=True)
class Cell:
    technique: str
    fraction: float | None = None  # the window of a window cell
    error: float = 0.0  # relative squared error measured for this choice
    price: float = 0.0  # its price / the layer's full price (a full step's cached residual included)


FULL = Cell("full", price=1.0)


@dataclass(frozen=True)
class StepReuse:
    """What skipping whole steps errs and saves. `errors[(step, last, before)]`: the error of answering
    `step` from the prediction of step `last` (before = -1: reuse) or extrapolated from steps `last` and
    `before` (forecast), converted into the cells' units (the summed local error that errs the model
    output as much); `saving`: the rest of a forward (all but the compressible layers' attention), in
    units of one layer's full attention price."""

    errors: dict[tuple[int, int, int], float] = field(default_factory=dict)
    saving: float = 0.0

    def best(self, step: int, last: int, before: int | None) -> tuple[str, float] | None:
        """The step reuse of least error at `step` after computing `last` (and `before`), if measured."""
        found = [("reuse", self.errors.get((step, last, -1))),
                 ("forecast", None if before is None else self.errors.get((step, last, before)))]
        found = [(how, error) for how, error in found if error is not None]
        return min(found, key=lambda option: option[1], default=None)


@dataclass(frozen=True)
class Allocation:
    cells: list[list[Cell]]  # [step][layer]
    step_reuse: list[str | None]  # [step] -> how a skipped step takes its prediction; None where it computes
    reuse_errors: list[float]  # [step] -> a skipped step's error (cells' units); 0 where it computes


@dataclass(frozen=True)
class _Path:
    """A layer's choices up to a step, as a linked list (cheap to extend from many states)."""

    cell: Cell
    before: _Path | None

    def cells(self) -> list[Cell]:
        path, found = self, []
        while path is not None:
            found.append(path.cell)
            path = path.before
        return found[::-1]


def layer_choices(errors: list[dict[Candidate, float]], slot: LayerSlot, weight: float,
                  ages: int, skipped: frozenset[int] = frozenset()) -> tuple[list[Cell], float, float]:
    """The choices of one layer over the steps (step 0 full: nothing is cached before it)
    minimising price / full price + weight x error; with their summed price and error. At `skipped`
    steps (step reuse) the layer does not run: a free step-sharing cell, its caches aging."""
    cap = ages + 1
    full = slot.price("full") or 1.0
    # state (since full, since computed, since its block ran, residual window) -> (objective, price, error, path)
    frontier: dict[tuple, tuple[float, float, float, _Path]] = {(1, 1, 1, None): (1.0, 1.0, 0.0, _Path(FULL, None))}
    for step, options in enumerate(errors[1:], start=1):
        reached: dict[tuple, tuple[float, float, float, _Path]] = {}
        for (since_full, since_computed, since_block, residual), (objective, price, error, path) in frontier.items():
            later, aged = min(since_full + 1, cap), (min(since_computed + 1, cap), min(since_block + 1, cap), residual)
            if step in skipped:
                state = (later, *aged)
                if state not in reached or objective < reached[state][0]:
                    reached[state] = (objective, price, error, _Path(Cell("ast"), path))
                continue
            moves = [(FULL, 1.0, (1, 1, 1, None))]
            for (name, fraction, age), cell_error in options.items():
                if name == "full+asc":
                    state = (later, 1, 1, residual)
                elif name == "ast" and age == since_computed:
                    state = (later, min(since_computed + 1, cap), 1, residual)
                elif name == BLOCK and age == since_block:  # nothing of the layer runs: every cache ages
                    state = (later, *aged)
                elif name.startswith("wars") and age == since_full and residual in (None, fraction):
                    state = (later, 1, 1, fraction)
                else:
                    continue
                cost = slot.price(name, fraction or None) / full
                if name.startswith("wars") and residual is None:  # the full step cached this window's residual
                    cost += slot.price("wars", fraction) / full
                moves.append((Cell(name, fraction or None, cell_error, cost), cost, state))
            for cell, cost, state in moves:
                value = objective + cost + weight * cell.error
                if state not in reached or value < reached[state][0]:
                    reached[state] = (value, price + cost, error + cell.error, _Path(cell, path))
        frontier = reached
    _, price, error, path = min(frontier.values(), key=lambda entry: entry[0])
    return path.cells(), price * full, error


def in_runs(errors: list[dict[int, dict[Candidate, float]]], correlation: float) -> list[dict[int, dict[Candidate, float]]]:
    """Each reusing cell's error as it adds to the run it ends. The cells of a layer that read one kept
    residual (or output, or block change) `age` steps old err alike (what that step kept is stale in the
    same way), so a run's errors add partly in amplitude, not only in energy: the cell at age a counts
    e_a + 2 x correlation x sqrt(e_a) x sum over i < a of sqrt(e_i), e_i the same candidate's error at age i,
    a - i steps earlier (measured on the demo model: a run's final error between the sums in energy and in
    amplitude, nearer the middle)."""
    found: list[dict[int, dict[Candidate, float]]] = []
    for step, layers in enumerate(errors):
        found.append({})
        for layer, options in layers.items():
            found[step][layer] = {}
            for (name, fraction, age), error in options.items():
                if name in REUSING and age > 1:
                    earlier = sum(math.sqrt(errors[step - age + older].get(layer, {}).get((name, fraction, older), 0.0))
                                  for older in range(1, age) if step - age + older >= 0)
                    error += 2 * correlation * math.sqrt(error) * earlier
                found[step][layer][(name, fraction, age)] = error
    return found


def allocate(errors: list[dict[int, dict[Candidate, float]]], slots: list[LayerSlot], budget: float,
             ages: int, reuse: StepReuse | None = None, correlation: float = 0.0) -> Allocation:
    """The cheapest plan (by bisection on lambda) whose summed error across all measured (step, layer)
    cells, and skipped steps, is within `budget`; layers never measured stay full. With `correlation`, the
    errors of a run of cells reading one kept thing add as `in_runs` says."""
    errors = in_runs(errors, correlation) if correlation else errors
    measured = sorted({layer for step in errors for layer in step})

    def layers(weight: float, skipped: dict[int, tuple[str, float]]) -> tuple[dict[int, list[Cell]], float]:
        chosen = {layer: layer_choices([step.get(layer, {}) for step in errors], slots[layer], weight, ages,
                                       frozenset(skipped)) for layer in measured}
        error = sum(error for _, _, error in chosen.values()) + sum(error for _, error in skipped.values())
        return {layer: cells for layer, (cells, _, _) in chosen.items()}, error

    def solve(weight: float) -> tuple[tuple[dict[int, list[Cell]], dict[int, tuple[str, float]]], float]:
        chosen, error = layers(weight, {})
        skipped = _skipped_steps(chosen, reuse, weight, len(errors), ages) if reuse is not None else {}
        if skipped:
            chosen, error = layers(weight, skipped)
        return (chosen, skipped), error

    low, high = (math.log(weight) for weight in WEIGHTS)
    best, error = solve(math.exp(low))
    if error > budget:
        best, _ = solve(math.exp(high))  # errs at most as much as any weight in range: the fallback
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            found, error = solve(math.exp(middle))
            if error <= budget:
                best, high = found, middle
            else:
                low = middle
    chosen, skipped = best
    steps = range(len(errors))
    return Allocation([[chosen[layer][step] if layer in chosen else FULL for layer in range(len(slots))]
                       for step in steps], [skipped[step][0] if step in skipped else None for step in steps],
                      [skipped[step][1] if step in skipped else 0.0 for step in steps])


def _skipped_steps(chosen: dict[int, list[Cell]], reuse: StepReuse, weight: float, steps: int,
                   ages: int) -> dict[int, tuple[str, float]]:
    """Steps to skip, walked in order: a step is skipped where its step reuse's weighted error is
    below what running it costs with the layers' own choices (the rest of the forward, plus each
    layer's price and weighted error there); reuse reads at most `ages` steps back. (Counting a run of
    skipped steps as `in_runs` counts cells was tried, BENCHMARKS.md: no better plans.)"""
    skipped: dict[int, tuple[str, float]] = {}
    last, before = 0, None
    for step in range(1, steps):
        running = reuse.saving + sum(cells[step].price + weight * cells[step].error for cells in chosen.values())
        option = reuse.best(step, last, before) if step - last <= ages else None
        if option is not None and weight * option[1] < running:
            skipped[step] = option
        else:
            last, before = step, last
    return skipped
