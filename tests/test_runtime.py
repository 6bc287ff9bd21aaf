"""The attention hook runtime on ComfyUI's own model classes: bit-identical to the unpatched
model when every layer is full (README's and docs/host-paths.md's promise, on all seven architectures), and it sees the
steps, layers, batch halves and token layout the model really has."""

from __future__ import annotations

import time
import types

import comfy.ldm.pixart.blocks
import pytest
import torch
from harness import pack_import
from harness.chains import patched_with_nodes
from harness.models import (
    ARCHITECTURES,
    SPECS,
    build_model,
    conditioning,
    empty_latent,
    expected_layers,
    joint_text_tokens,
    linear_timeline,
    sample,
    token_grid,
)

patching = pack_import("patching")
runtime = pack_import("patching.runtime")
state = pack_import("patching.state")

STEPS = 3
TEXT_LEN = 7


def _latent(arch: str, batch: int = 1, scale: int = 1) -> dict:
    spec = SPECS[arch]
    height, width = spec.size
    return empty_latent(arch, height * scale, width * scale, batch=batch, frames=2 if spec.video else 1)


def _prompts(arch: str, negative_len: int = TEXT_LEN) -> tuple[list, list]:
    return conditioning(arch, TEXT_LEN, seed=1), conditioning(arch, negative_len, seed=2)


def _run(model, arch: str, latent: dict, negative_len: int = TEXT_LEN) -> torch.Tensor:
    positive, negative = _prompts(arch, negative_len)
    return sample(model, positive, negative, latent, steps=STEPS, cfg=3.0, seed=0)


def _kinds(report) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in report.layers:
        counts[layer.kind] = counts.get(layer.kind, 0) + 1
    return counts


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request):
    return request.param, build_model(request.param, seed=0)


def test_full_attention_is_exact_and_sees_the_model(arch_model):
    arch, model = arch_model
    latent = _latent(arch)
    reference = _run(model, arch, latent)
    joint_text = []

    def note_text(apply_model, args: dict) -> torch.Tensor:  # the text tokens of the model's joint calls
        joint_text.append(joint_text_tokens(arch, args["c"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = patching.install(model)
    patched.set_model_unet_function_wrapper(note_text)
    out = _run(patched, arch, latent)

    assert torch.isfinite(reference).all()
    assert torch.equal(out, reference)
    report = patching.patch_of(patched).last_report
    expected = {kind: n for kind, n in expected_layers(arch).items() if n}
    assert _kinds(report) == expected
    assert report.layers_per_forward == {sum(expected.values())}
    assert report.total_steps == STEPS and report.steps_seen == set(range(STEPS))
    assert report.batch_halves == {(1, 0)}  # CFG batches the unconditional chunk first
    assert report.forwards == STEPS
    for layer in report.layers:
        if layer.kind in ("joint", "image", "cross"):
            assert layer.layout is not None and layer.layout.grid == token_grid(arch, latent)
        if layer.kind == "joint":
            assert layer.layout.text_len == joint_text[0]
            assert layer.layout.text_first == SPECS[arch].text_first
        if layer.kind == "image":
            assert layer.layout.text_len == 0


def test_technique_nodes_acting_nowhere_are_exact(arch_model):
    """The nodes with their branch hooks installed (every mapped projection's forward replaced)
    but covering no layer of the model: bit-identical too."""
    arch, model = arch_model
    latent = _latent(arch)
    nowhere = [{"technique": technique, "layers": "50"} for technique in ("window", "step", "cfg")]
    patched = patched_with_nodes(model, nowhere)
    assert torch.equal(_run(patched, arch, latent), _run(model, arch, latent))
    assert set(patching.patch_of(patched).last_report.flops_by_technique) == {"full"}


def test_heads_first_view_matches_each_architecture(arch_model):
    """Recomputing attention from the runtime's [B, H, N, D] view reproduces the host's
    output, so methods that replace attention read every model's tensors correctly."""
    arch, model = arch_model

    def sdpa_from_view(call, site, run):
        if call.mask is not None:
            return call.run_default(), call.flops(), "full"
        q, k, v = call.heads_first()
        return call.format_output(torch.nn.functional.scaled_dot_product_attention(q, k, v)), call.flops(), "sdpa"

    latent = _latent(arch)
    reference = _run(model, arch, latent)
    out = _run(patching.install(model, sdpa_from_view), arch, latent)
    assert (out - reference).abs().max().item() <= 1e-5


def test_the_given_model_is_not_patched(arch_model):
    arch, model = arch_model
    patching.install(model)
    assert runtime.PATCH_KEY not in model.model_options["transformer_options"]
    assert runtime.PATCH_KEY not in str(model.model_options["transformer_options"].get("wrappers", {}))


@pytest.mark.parametrize("arch", ["sd3", "wan"])
def test_batch_of_two(arch):
    model = build_model(arch)
    latent = _latent(arch, batch=2)
    reference = _run(model, arch, latent)
    patched = patching.install(model)
    out = _run(patched, arch, latent)
    assert out.shape[0] == 2
    assert torch.equal(out, reference)
    assert patching.patch_of(patched).last_report.batch_halves == {(1, 0)}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_conditional_and_unconditional_in_separate_calls(arch):
    """Prompts of very different lengths cannot be batched: ComfyUI calls the model once per half."""
    model = build_model(arch)
    latent = _latent(arch)
    reference = _run(model, arch, latent, negative_len=2)
    patched = patching.install(model)
    out = _run(patched, arch, latent, negative_len=2)
    report = patching.patch_of(patched).last_report
    assert torch.equal(out, reference)
    assert report.batch_halves == {(0,), (1,)}
    assert report.forwards == 2 * STEPS


def test_two_resolutions_on_one_patched_model():
    arch = "sd3"
    model = build_model(arch)
    patched = patching.install(model)
    for scale in (1, 2):
        latent = _latent(arch, scale=scale)
        out = _run(patched, arch, latent)
        assert torch.equal(out, _run(model, arch, latent))
        report = patching.patch_of(patched).last_report
        assert report.forwards == STEPS  # nothing carried over from the first run
        assert {layer.layout.grid for layer in report.layers} == {token_grid(arch, latent)}


def test_an_exception_mid_run_leaves_no_state():
    arch = "sd3"
    model = build_model(arch)
    latent = _latent(arch)
    reference = _run(model, arch, latent)
    failing = {"armed": True}

    def fail_at_second_step(call, site, run):
        if failing["armed"] and site.step == 1:
            raise RuntimeError("boom")
        return call.run_default(), call.flops(), "full"

    patched = patching.install(model, fail_at_second_step)
    with pytest.raises(RuntimeError, match="boom"):
        _run(patched, arch, latent)
    options = patched.model_options["transformer_options"]
    assert runtime.RUN_KEY not in options and state.OVERRIDE_KEY not in options
    report = patching.patch_of(patched).last_report
    assert report.steps_seen == {0}  # the failed run's report ends where it failed

    failing["armed"] = False
    out = _run(patched, arch, latent)
    assert torch.equal(out, reference)
    assert patching.patch_of(patched).last_report.steps_seen == set(range(STEPS))


def test_the_report_has_the_runs_sampling_wall_time():
    """Timed from sampling start to end: a run whose model calls sleep 0.1 s each (3 steps) took
    at least 0.3 s, and no more than the whole call to the sampler around it."""
    arch = "sd3"
    patched = patching.install(build_model(arch))

    def slow(apply_model, args: dict) -> torch.Tensor:
        time.sleep(0.1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(slow)
    start = time.perf_counter()
    _run(patched, arch, _latent(arch))
    outside = time.perf_counter() - start
    report = patching.patch_of(patched).last_report
    assert 0.1 * STEPS <= report.wall_seconds <= outside
    assert f"over {STEPS}/{STEPS} steps in {report.wall_seconds:.2f} s of sampling wall time" in report.summary()


def test_another_override_is_chained_not_replaced():
    arch = "flux"
    model = build_model(arch)
    latent = _latent(arch)
    reference = _run(model, arch, latent)
    calls = []

    def other_pack_override(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    other = model.clone()
    other.model_options["transformer_options"][state.OVERRIDE_KEY] = other_pack_override
    patched = patching.install(other)
    out = _run(patched, arch, latent)
    assert torch.equal(out, reference)
    report = patching.patch_of(patched).last_report
    assert len(calls) == report.forwards * len(report.layers) > 0


def test_pixart_routing_is_undone_after_each_forward():
    original = comfy.ldm.pixart.blocks.optimized_attention
    model = build_model("pixart")
    patched = patching.install(model)
    _run(patched, "pixart", _latent("pixart"))
    assert comfy.ldm.pixart.blocks.optimized_attention is original
    assert patching.patch_of(patched).last_report.forwards == STEPS


def test_unknown_architecture_is_named_at_patch_time():
    class TinyUnknownDiT(torch.nn.Module):
        pass

    fake_patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=TinyUnknownDiT()))
    with pytest.raises(patching.UnsupportedArchitectureError, match="TinyUnknownDiT.*supported architectures: Flux"):
        patching.install(fake_patcher)


def test_step_of_maps_intermediate_sigmas_to_their_step():
    timeline = linear_timeline(3, [1.0, 0.6, 0.3, 0.0])
    assert [timeline.step_of(s) for s in (1.0, 0.8, 0.6, 0.45, 0.3, 0.1)] == [0, 0, 1, 1, 2, 2]
