"""DeepCache's 1:N schedule: which steps of a sampling run compute the full U-Net.

Only the steps whose sigma lies in the node's noise range take part ("active" steps, counted
from the first of them); every other step runs the full U-Net. Among the active steps:
- uniform: every N-th active step is full, starting with the first (1:N inference);
- non-uniform: as many full steps as uniform has (ceil(active / N)), spaced by a power law
  around a centre step (DeepCache's quadratic-centred sampling): dense where the deep features
  change fastest, sparse far from it. The first active step is always full (nothing is cached
  before it).
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["uniform", "non-uniform"]
SCHEDULES: tuple[ScheduleKind, ...] = ("uniform", "non-uniform")
CENTER = 0.3  # non-uniform: the densest full steps around this fraction of the active steps
POWER = 1.4  # non-uniform: spacing grows as distance ** POWER (lowered until the count fits)


def full_positions(count: int, interval: int, kind: ScheduleKind) -> frozenset[int]:
    """Positions (0 = the first active step) of the full U-Net steps among `count` active steps."""
    if interval < 1:
        raise ValueError(f"DeepCache: cache interval must be at least 1, got {interval}")
    if kind not in SCHEDULES:
        raise ValueError(f"DeepCache: schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if count <= 0:
        return frozenset()
    if kind == "uniform" or interval == 1:
        return frozenset(range(0, count, interval))
    return _power_spaced(count, math.ceil(count / interval))


def _power_spaced(count: int, wanted: int) -> frozenset[int]:
    """`wanted` distinct positions in [0, count): position 0, then centre + sign(u) * |u| ** p for u
    evenly spaced over [-centre ** (1/p), (count - centre) ** (1/p)), with p lowered from POWER
    towards 1 (even spacing, which always gives `wanted` distinct positions) until they are distinct."""
    centre = CENTER * count
    power = POWER
    while True:
        low, high = -(centre ** (1 / power)), (count - centre) ** (1 / power)
        points = [low + (high - low) * i / wanted for i in range(wanted)]
        positions = {0} | {min(count - 1, math.floor(centre + math.copysign(abs(u) ** power, u))) for u in points}
        if len(positions) == wanted or power <= 1.0:
            return frozenset(positions)
        power = max(1.0, power - 0.02)


def full_steps(steps: int, active: tuple[int, ...], interval: int, kind: ScheduleKind) -> frozenset[int]:
    """Steps of a run of `steps` steps that compute the full U-Net: the scheduled ones among the
    `active` steps (those inside the start / end noise range) and every step outside the range."""
    scheduled = {active[position] for position in full_positions(len(active), interval, kind)}
    return frozenset(step for step in range(steps) if step not in active or step in scheduled)
