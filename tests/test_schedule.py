"""DiTFastAttn's schedule: which technique each (step, layer) gets, as pure data."""

from __future__ import annotations

import pytest
from harness import pack_import
from harness.models import linear_timeline

schedule = pack_import("patching.schedule")
kernels = pack_import("kernels")
S = schedule


def _computes(sched, total: int, layer: int = 0) -> list[str]:
    timeline = linear_timeline(total)
    return [sched.choose(step, timeline, layer).compute for step in range(total)]


def test_window_residual_refreshes_every_k_steps_from_its_first_step():
    sched = S.Schedule((S.WindowResidual(refresh_every=3),))
    assert _computes(sched, 7) == ["full", "window", "window", "full", "window", "window", "full"]
    assert [sched.residual_window(step, linear_timeline(7), 0) is not None for step in (0, 3, 6)] == [True, True, False]


def test_step_sharing_computes_every_kth_step_and_residual_survives_reuse():
    sched = S.Schedule((S.WindowResidual(refresh_every=2), S.StepSharing(compute_every=2, scope=S.Scope(S.NoiseRange(0.5, 1.0)))))
    # steps 0..7: sharing acts from step 4 on, computing steps 4 and 6.
    assert _computes(sched, 8) == ["full", "window", "full", "window", "full", "reuse", "full", "reuse"]
    assert sched.residual_window(4, linear_timeline(8), 0) is None  # step 6 is full again: no residual needed


def test_ranges_layers_and_cfg_flag():
    sched = S.Schedule((S.CFGSharing(S.Scope(S.NoiseRange(0.0, 0.5), S.parse_layers("1-2"))),))
    timeline = linear_timeline(4)
    assert [sched.choose(step, timeline, 1).share_cfg for step in range(4)] == [True, True, False, False]
    assert not sched.choose(0, timeline, 0).share_cfg and not sched.choose(0, timeline, 3).share_cfg


def test_later_node_wins_for_the_same_technique():
    sched = S.Schedule((S.StepSharing(compute_every=2), S.StepSharing(compute_every=3)))
    assert _computes(sched, 6) == ["full", "reuse", "reuse", "full", "reuse", "reuse"]


def test_parse_layers():
    assert S.parse_layers("") is None
    assert S.parse_layers(" 0-3, 7 ") == frozenset({0, 1, 2, 3, 7})
    with pytest.raises(ValueError, match="cannot read 'a'"):
        S.parse_layers("1, a")
    with pytest.raises(ValueError, match="runs backwards"):
        S.parse_layers("5-2")


@pytest.mark.parametrize("bad", [dict(refresh_every=1), dict(window=None)])
def test_bad_settings_are_clear_errors(bad):
    if "window" in bad:
        with pytest.raises(ValueError, match="fraction must be in"):
            S.WindowSize(fraction=0.0)
    else:
        with pytest.raises(ValueError, match="refresh_every must be >= 2"):
            S.WindowResidual(**bad)
    with pytest.raises(ValueError, match="start <= end"):
        S.NoiseRange(0.8, 0.2)


def test_window_sizes():
    layout = kernels.TokenLayout(512, (64, 64))
    assert S.WindowSize("band", 0.125).window_for(layout) == kernels.Window("band", 512)
    assert S.WindowSize("band", tokens=100).window_for(layout) == kernels.Window("band", 100)
    assert S.WindowSize("circle", 0.25).window_for(layout) == kernels.Window("circle", 16)
    video = kernels.TokenLayout(0, (8, 32, 32))
    assert S.WindowSize("square", 0.25).window_for(video) == kernels.Window("square", 8, temporal_radius=2)


def test_plain_window_needs_no_residual():
    sched = S.Schedule((S.WindowResidual(refresh_every=2, residual=False),))
    assert sched.choose(1, linear_timeline(4), 0) == S.Choice("window", False, S.WindowSize(), residual=False)
    assert sched.residual_window(0, linear_timeline(4), 0) is None
