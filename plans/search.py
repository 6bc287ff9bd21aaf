"""The budget search: the technique of every (step, layer) chosen at once, not step by step.

Input: each candidate's local error at each (step, layer), measured in one sampling run with full
attention (relative squared error of the layer's attention output against its full output), and
each candidate's price (plans/costs.py). A candidate is (technique, window fraction, age): step
sharing reusing the output computed `age` steps earlier, window + residual with a window of that
fraction and the residual cached `age` steps earlier (at the layer's last full step), either with
CFG sharing, and full + CFG sharing.

For a weight lambda, each layer's sequence of choices minimising  price / full price + lambda x
error, summed over the steps, is found exactly by dynamic programming over the layer's state
(steps since its last full step, since its last computed step, and the window its residual was
cached for: one window per residual, paid for once at the full step). Lambda is bisected to the
cheapest plan whose summed error stays within the budget. Layers are independent for a given
lambda (their errors add), so the allocation is a Lagrangian relaxation of the knapsack over all
(step, layer) cells: error goes where it buys the most time, early or late, in whichever layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .costs import LayerSlot

Candidate = tuple[str, float, int]  # (technique, window fraction (0 where none), age in steps (0 where none))
BISECTIONS = 30
WEIGHTS = (1e-4, 1e8)  # the lambda range searched (prices are relative to full attention's)


@dataclass(frozen=True)
class Cell:
    technique: str
    fraction: float | None = None  # the window of a window cell
    error: float = 0.0  # relative squared error measured for this choice


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
                  ages: int) -> tuple[list[Cell], float, float]:
    """The choices of one layer over the steps (step 0 full: nothing is cached before it)
    minimising price / full price + weight x error; with their summed price and error."""
    cap = ages + 1
    full = slot.price("full") or 1.0
    # state (since full, since computed, residual window) -> (objective, price, error, path)
    frontier: dict[tuple, tuple[float, float, float, _Path]] = {(1, 1, None): (1.0, 1.0, 0.0, _Path(Cell("full"), None))}
    for options in errors[1:]:
        reached: dict[tuple, tuple[float, float, float, _Path]] = {}
        for (since_full, since_computed, residual), (objective, price, error, path) in frontier.items():
            later = min(since_full + 1, cap)
            moves = [(Cell("full"), 1.0, (1, 1, None))]
            for (name, fraction, age), cell_error in options.items():
                if name == "full+asc":
                    state = (later, 1, residual)
                elif name == "ast" and age == since_computed:
                    state = (later, min(since_computed + 1, cap), residual)
                elif name.startswith("wars") and age == since_full and residual in (None, fraction):
                    state = (later, 1, fraction)
                else:
                    continue
                cost = slot.price(name, fraction or None) / full
                if name.startswith("wars") and residual is None:  # the full step cached this window's residual
                    cost += slot.price("wars", fraction) / full
                moves.append((Cell(name, fraction or None, cell_error), cost, state))
            for cell, cost, state in moves:
                value = objective + cost + weight * cell.error
                if state not in reached or value < reached[state][0]:
                    reached[state] = (value, price + cost, error + cell.error, _Path(cell, path))
        frontier = reached
    _, price, error, path = min(frontier.values(), key=lambda entry: entry[0])
    return path.cells(), price * full, error


def allocate(errors: list[dict[int, dict[Candidate, float]]], slots: list[LayerSlot], budget: float,
             ages: int) -> list[list[Cell]]:
    """Cells [step][layer] of the cheapest plan (by bisection on lambda) whose summed error across
    all measured (step, layer) cells is within `budget`; layers never measured stay full."""
    measured = sorted({layer for step in errors for layer in step})

    def solve(weight: float) -> tuple[dict[int, list[Cell]], float]:
        chosen = {layer: layer_choices([step.get(layer, {}) for step in errors], slots[layer], weight, ages)
                  for layer in measured}
        return {layer: cells for layer, (cells, _, _) in chosen.items()}, sum(error for _, _, error in chosen.values())

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
    return [[best[layer][step] if layer in best else Cell("full") for layer in range(len(slots))]
            for step in range(len(errors))]
