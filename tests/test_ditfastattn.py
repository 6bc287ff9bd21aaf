"""DiTFastAttn's techniques on ComfyUI's own model classes, through ComfyUI's sampling path."""

from __future__ import annotations

import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample

patching = pack_import("patching")
S = pack_import("patching.schedule")
DiTFastAttn = pack_import("patching.ditfastattn").DiTFastAttn
nodes = pack_import("nodes.ditfastattn")

ARCHS = ("flux", "sd3", "wan", "pixart")
SIZE = {"pixart": (34, 34), "wan": (8, 12)}
FRAMES = {"wan": 2}
STEPS = 4


def _latent(arch: str, batch: int = 1, scale: int = 1) -> dict:
    height, width = SIZE.get(arch, (16, 16))
    return empty_latent(arch, height * scale, width * scale, batch=batch, frames=FRAMES.get(arch, 1))


def _run(model, arch: str, latent: dict, cfg: float = 3.0) -> torch.Tensor:
    positive, negative = conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2)
    return sample(model, positive, negative, latent, steps=STEPS, cfg=cfg, seed=0)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


class Spy:
    """Wraps a method and records every call's site, technique and output."""

    def __init__(self, method) -> None:
        self.method = method
        self.records: list[tuple] = []

    def __call__(self, call, site, run):
        out, flops, technique = self.method(call, site, run)
        self.records.append((site, technique, out.clone(), call))
        return out, flops, technique

    def finish_run(self, run) -> None:
        self.method.finish_run(run)


def _spied(model, *techniques) -> tuple:
    spy = Spy(DiTFastAttn(S.Schedule(techniques)))
    return patching.install(model, spy), spy


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, build_model(request.param)


def test_window_covering_everything_equals_full_attention(arch_model):
    arch, model = arch_model
    latent = _latent(arch)
    reference = _run(model, arch, latent)
    patched, spy = _spied(model, S.WindowResidual(S.WindowSize("band", fraction=1.0), refresh_every=STEPS))
    out = _run(patched, arch, latent)
    assert {technique for _, technique, _, _ in spy.records} >= {"full", "window+residual"}
    assert _close(out, reference, 1e-4)


def test_window_plus_residual_is_the_cached_residual_added_to_the_window(arch_model):
    """Full steps return the host's attention exactly; window steps return window + (full -
    window) of the last full step, for that layer and half."""
    arch, model = arch_model
    kernels = pack_import("kernels")
    size = S.WindowSize("band", tokens=3)
    patched, spy = _spied(model, S.WindowResidual(size, refresh_every=2))
    _run(patched, arch, _latent(arch))
    last_residual = {}
    checked = 0
    for site, technique, out, call in spy.records:
        if site.kind not in ("joint", "image"):
            assert technique == "full"
            continue
        q, k, v = call.heads_first()
        window = kernels.reference_attention(q, k, v, site.layout, size.window_for(site.layout))
        if technique == "full":
            assert torch.equal(out, call.run_default())
            last_residual[site.layer] = call.output_heads_first(out) - window
        else:
            expected = call.format_output(window + last_residual[site.layer])
            assert _close(out, expected, 1e-5)
            checked += 1
    assert checked > 0


def test_shared_step_returns_the_stored_output_exactly(arch_model):
    arch, model = arch_model
    patched, spy = _spied(model, S.StepSharing(compute_every=2))
    _run(patched, arch, _latent(arch))
    last = {}
    shared = 0
    for site, technique, out, _ in spy.records:
        key = (site.layer, site.cond_or_uncond)
        if technique == "step sharing":
            assert torch.equal(out, last[key]) and site.step % 2 == 1
            shared += 1
        else:
            last[key] = out
    assert shared > 0
    report = patching.patch_of(patched).last_report
    assert report.flops_by_technique["step sharing"][0] == 0
    assert report.computed_flops < report.full_flops


def test_cfg_sharing_copies_the_conditional_half(arch_model):
    arch, model = arch_model
    patched, spy = _spied(model, S.CFGSharing(S.Scope(layers=frozenset({0, 1}))))
    _run(patched, arch, _latent(arch, batch=2))
    for site, technique, out, _ in spy.records:
        assert site.cond_or_uncond == (1, 0)
        if site.layer in (0, 1) and site.kind in ("joint", "image"):  # cross-attention is never shared
            assert technique == "full + cfg sharing"
            uncond, cond = out.chunk(2)
            assert torch.equal(uncond, cond)
        else:
            assert technique == "full"


def test_cfg_sharing_across_separate_calls(caplog):
    """Prompts of very different lengths run as separate calls, conditional first: its
    image-only attention is copied to the unconditional call; joint attention of another
    text length cannot be copied and is computed, with one log line."""
    arch = "wan"
    model = build_model(arch)
    patched, spy = _spied(model, S.CFGSharing())
    positive, negative = conditioning(arch, 7, seed=1), conditioning(arch, 2, seed=2)
    sample(patched, positive, negative, _latent(arch), steps=STEPS, cfg=3.0)
    by_call = {(site.step, site.layer, site.cond_or_uncond): (site, technique, out)
               for site, technique, out, _ in spy.records}
    shared = 0
    for (step, layer, halves), (site, technique, out) in by_call.items():
        if halves == (1,) and site.kind == "image":
            assert technique == "cfg sharing"
            assert torch.equal(out, by_call[(step, layer, (0,))][2])
            shared += 1
    assert shared == STEPS * 2

    sd3, spy = _spied(build_model("sd3"), S.CFGSharing())
    with caplog.at_level("INFO"):
        sample(sd3, conditioning("sd3", 7), conditioning("sd3", 2), _latent("sd3"), steps=2, cfg=3.0)
    stood_aside = [message for message in caplog.messages if message.startswith("FastAttn: a technique stood aside")]
    assert len(stood_aside) == 1 and "CFG sharing found no conditional output" in stood_aside[0]
    assert list(patching.patch_of(sd3).last_report.stood_aside.values()) == [4]  # 2 steps x 2 joint layers


def test_no_state_leaks_across_runs_resolutions_and_batch_sizes():
    arch = "flux"
    model = build_model(arch)
    chain = nodes.WindowResidualAttention.execute(
        model, window_shape=next(iter(nodes.WINDOW_SHAPES)), window_fraction=0.125, window_tokens=0, refresh_every=2,
        residual=True, start_percent=0.0, end_percent=1.0, layers="").result[0]
    chain = nodes.StepSharingAttention.execute(chain, 3, 0.5, 1.0, "").result[0]
    patched = nodes.CFGSharingAttention.execute(chain, 0.0, 1.0, "").result[0]
    first = _run(patched, arch, _latent(arch))
    _run(patched, arch, _latent(arch, scale=2))
    _run(patched, arch, _latent(arch, batch=2))
    assert torch.equal(_run(patched, arch, _latent(arch)), first)
    techniques = patching.patch_of(patched).method.schedule.techniques
    assert [type(t).__name__ for t in techniques] == ["WindowResidual", "StepSharing", "CFGSharing"]
    assert patching.patch_of(model) is None and patching.patch_of(chain).method.schedule.techniques == techniques[:2]


@pytest.mark.parametrize("arch", ["sd3", "wan"])
def test_batch_of_two_keeps_each_image_as_it_would_be_alone(arch):
    """The first image of a batch of two (its noise is the same) comes out as when sampled alone:
    caches are kept per batch half and the halves are split correctly."""
    model = build_model(arch)
    patched, _ = _spied(model, S.WindowResidual(S.WindowSize("band", tokens=4)), S.StepSharing(3),
                        S.CFGSharing(S.Scope(S.NoiseRange(0.0, 0.5))))
    alone = _run(patched, arch, _latent(arch))
    both = _run(patched, arch, _latent(arch, batch=2))
    assert both.shape[0] == 2 and not torch.equal(both[0], both[1])
    assert _close(both[:1], alone, 1e-4)


def test_bad_layers_string_is_a_clear_error():
    model = build_model("sd3")
    with pytest.raises(ValueError, match="cannot read 'x'"):
        nodes.CFGSharingAttention.execute(model, 0.0, 1.0, "0-2, x")


def test_plain_window_without_residual_is_only_the_window():
    arch = "sd3"
    kernels = pack_import("kernels")
    size = S.WindowSize("band", tokens=3)
    patched, spy = _spied(build_model(arch), S.WindowResidual(size, refresh_every=2, residual=False))
    _run(patched, arch, _latent(arch))
    windowed = [(site, out, call) for site, technique, out, call in spy.records if technique == "window"]
    assert windowed
    for site, out, call in windowed:
        q, k, v = call.heads_first()
        expected = call.format_output(kernels.reference_attention(q, k, v, site.layout, size.window_for(site.layout)))
        assert _close(out, expected, 1e-5)


def test_two_positive_prompts_keep_their_own_attention():
    """Combined conditionings run as several conditional chunks in one batch: CFG sharing
    computes each of them and copies only to the unconditional chunk; step sharing keeps one
    stored output per chunk."""
    arch = "sd3"
    patched, spy = _spied(build_model(arch), S.CFGSharing(), S.StepSharing(2))
    positive = conditioning(arch, 7, seed=1) + conditioning(arch, 7, seed=3)
    sample(patched, positive, conditioning(arch, 7, seed=2), _latent(arch), steps=STEPS, cfg=3.0)
    batched = [(site, technique, out) for site, technique, out, _ in spy.records if len(site.cond_or_uncond) == 3]
    assert batched and all(sorted(site.cond_or_uncond) == [0, 0, 1] for site, _, _ in batched)
    for site, technique, out in batched:
        chunks = out.chunk(3)
        conditional = [chunks[i] for i, half in enumerate(site.cond_or_uncond) if half == 0]
        unconditional = chunks[site.cond_or_uncond.index(1)]
        assert not torch.equal(conditional[0], conditional[1])
        assert torch.equal(unconditional, conditional[0])
        assert technique in ("full + cfg sharing", "step sharing")
    assert {technique for _, technique, _ in batched} == {"full + cfg sharing", "step sharing"}
