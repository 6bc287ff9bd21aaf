"""Speed-ups that load on a shared machine cannot fake, for `make demo`.

Every workflow runs once per round and the rounds start at different workflows, so no workflow
is always timed first (the baseline, timed first under load, once made every technique look
faster than its FLOPs allow). A technique's speed-up is the median over rounds of the baseline's
time in that round over its own. A technique cannot be faster than the FLOPs it skips allow:
a median above that bound is a measurement error and is shown as one, not as a result.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

INSPECTOR_SHARE = re.compile(r"= ([\d.]+)% attention")
REPORT_FLOPS = re.compile(r"attention FLOPs computed [\d.]+% of full, ([\d.e+]+) of ([\d.e+]+) GFLOPs")
REPORT_PROJECTIONS = re.compile(r"([\d.e+]+) GFLOPs of projections saved")
REPORT_REUSED = re.compile(r"answered by step reuse, ([\d.e+]+) GFLOPs of attention not run")
REPORT_BLOCKS = re.compile(r"block caching skipped blocks holding ([\d.e+]+) GFLOPs of attention")


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of each round: `names` rotated so that each round starts elsewhere."""
    step = max(1, len(names) // max(1, rounds))
    return [list(names[r * step % len(names):]) + list(names[:r * step % len(names)]) for r in range(rounds)]


def attention_share(inspector_text: str) -> float:
    """Attention's share of a forward's FLOPs, from the Attention Inspector's report."""
    return float(INSPECTOR_SHARE.search(inspector_text).group(1)) / 100.0


def flop_bound(share: float, report_text: str) -> float:
    """The largest speed-up the FLOPs allow: the unpatched run's FLOPs over the patched run's, from
    attention's share of the model's FLOPs and the Attention Report of the patched run (attention
    FLOPs computed of full, the projections' FLOPs branch sharing did not run, and the rest of each
    forward that step reuse skipped and of the blocks block caching skipped, in attention's proportion to it)."""
    match = REPORT_FLOPS.search(report_text)
    if match is None:
        return 1.0  # no report: nothing was skipped
    computed, full = float(match.group(1)), float(match.group(2))
    projections, reused = REPORT_PROJECTIONS.search(report_text), REPORT_REUSED.search(report_text)
    saved = (full - computed) + (float(projections.group(1)) if projections else 0.0)
    skipped = sum(float(found.group(1)) for found in (reused, REPORT_BLOCKS.search(report_text)) if found)
    saved += skipped * (1 - share) / share
    total = full / share
    return total / (total - saved)


def round_speedups(baseline_seconds: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """Each round's speed-up: the baseline's time in that round over the technique's."""
    return [base / own for base, own in zip(baseline_seconds, seconds, strict=True)]


def median_speedup(baseline_seconds: Sequence[float], seconds: Sequence[float]) -> float:
    """The median over rounds of the baseline's time in a round over the technique's."""
    return statistics.median(round_speedups(baseline_seconds, seconds))


def speedup_cell(speedup: float, bound: float) -> str:
    """The table's speed-up, or the measurement error it is when above the FLOP bound."""
    if speedup > bound:
        return (f"measurement error: {speedup:.2f}x is above the FLOP bound (load on the machine, or time "
                "the FLOP count leaves out: softmax, overheads at a small size)")
    return f"{speedup:.2f}x"
