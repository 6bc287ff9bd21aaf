"""`make demo`'s speed-ups (demo/speed.py): interleaved rounds, medians, and the FLOP bound above
which a speed-up is shown as a measurement error, read from the reports the nodes really print."""

from __future__ import annotations

import pytest
from harness import pack_import

speed = pack_import("demo.speed")
report = pack_import("patching.report")

NAMES = ["baseline", "window_residual", "step_sharing", "cfg_sharing", "combined", "plan", "clear_zero_shot"]


def test_every_round_runs_every_workflow_once_and_starts_elsewhere():
    orders = speed.round_orders(NAMES, 3)
    assert len(orders) == 3 and all(sorted(order) == sorted(NAMES) for order in orders)
    assert len({order[0] for order in orders}) == 3  # the baseline is not always timed first
    assert [order.index("baseline") for order in orders] != [0, 0, 0]


def test_the_flop_bound_from_the_reports_text():
    """Attention half the FLOPs, 25 of 100 attention GFLOPs computed and 15 GFLOPs of projections
    not run: 200 GFLOPs in all unpatched, 200 - 75 - 15 = 110 patched."""
    run = report.RunReport("sd3", 4)
    run.count("window_residual", 25 * 10**9, 100 * 10**9)
    run.projection_flops_saved = 15 * 10**9
    inspector = "FLOPs per forward: attention 0.100 TFLOP of 0.200 TFLOP in all = 50.0% attention"
    share = speed.attention_share(inspector)
    assert share == pytest.approx(0.5)
    assert speed.flop_bound(share, run.summary()) == pytest.approx(200 / 110)
    run.projection_flops_saved = 0
    assert speed.flop_bound(share, run.summary()) == pytest.approx(200 / 125)
    assert speed.flop_bound(share, "") == 1.0  # the baseline: no report, nothing skipped
    run.count_reused("forecast", 3, 20 * 10**9)  # a skipped forward: its 20 attention GFLOPs and 20 others
    assert speed.flop_bound(share, run.summary()) == pytest.approx(240 / 125)  # 240 - 95 - 20 of the rest
    run.count("block cache", 0, 10 * 10**9)  # skipped blocks: their 10 attention GFLOPs and 10 others
    assert speed.flop_bound(share, run.summary()) == pytest.approx(260 / 125)  # 260 - 105 - 30 of the rest


def test_a_baseline_slowed_by_load_in_one_round_moves_no_median():
    baseline, technique = [30.0, 60.0, 31.0], [20.0, 21.0, 20.5]  # round 2's baseline ran under load
    assert speed.median_speedup(baseline, technique) == pytest.approx(31.0 / 20.5)


def test_a_speedup_above_the_flop_bound_is_shown_as_a_measurement_error():
    assert speed.speedup_cell(1.45, 1.6) == "1.45x"
    cell = speed.speedup_cell(2.5, 1.6)
    assert "measurement error" in cell and "2.50x" in cell
