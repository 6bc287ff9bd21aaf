"""Block caching's local errors for the budget search: how far a block's change (what it adds to its
streams, patching/block_cache.py) at each step is from its change 1..ages steps earlier, relative to
the change itself, measured in the budget search's one run with full attention.

The error is the relative squared error of the block's change, where a layer's candidates are scored on
its attention output: both are the relative error of what one piece of the forward adds to the residual
stream, the units the search sums under its budget."""

from __future__ import annotations

import torch

Changes = list[torch.Tensor | None]  # one per stream the block returns (None: a stream it returns as None)


class BlockScorer:
    def __init__(self, ages: int) -> None:
        self.ages = ages
        self.history: dict[int, list[tuple[int, Changes]]] = {}  # block's first layer -> (step, changes), oldest first
        self.errors: dict[int, dict[int, float]] = {}  # block's first layer -> age -> error, at the step scored last

    def score(self, step: int, layer: int, changes: Changes) -> None:
        """Score the change of the block beginning at `layer` at `step` against its kept changes."""
        kept = [(made, old) for made, old in self.history.get(layer, []) if step - made <= self.ages]
        self.errors[layer] = {}
        norm = sum(change.double().square().sum() for change in changes if change is not None)
        if changes and norm > 0:
            for made, old in kept:
                if made < step and _same_shapes(old, changes):
                    error = sum((a.double() - b.double()).square().sum()
                                for a, b in zip(old, changes, strict=True) if b is not None)
                    self.errors[layer][step - made] = float(error / norm)
        self.history[layer] = [*kept, (step, changes)] if changes else kept


def _same_shapes(old: Changes, new: Changes) -> bool:
    return len(old) == len(new) and all((a is None) == (b is None) and (a is None or a.shape == b.shape)
                                        for a, b in zip(old, new, strict=True))
