"""Never silently wrong: every way ComfyUI calls a model, against an independent reference.

Each test samples with the pack's nodes and with `harness.reference_schedule` (a float64
implementation of the same chain written apart from the pack) through the host's real guiders,
samplers and extensions, or checks that a technique stands aside (output equal to the unpatched
model's) where it cannot apply.
"""

from __future__ import annotations

import random

import comfy.samplers
import node_helpers
import pytest
import torch
from comfy_extras import nodes_context_windows, nodes_custom_sampler, nodes_perpneg, nodes_slg
from harness import pack_import
from harness.models import (
    ARCHITECTURES,
    CORE_ARCHITECTURES,
    SPECS,
    build_model,
    conditioning,
    empty_latent,
    expected_layers,
    linear_timeline,
    sample,
)
from harness.reference_schedule import patched_with_nodes, reference_model

patching = pack_import("patching")
STEPS = 4


def _latent(arch: str, batch: int = 1, frames: int | None = None) -> dict:
    spec = SPECS[arch]
    return empty_latent(arch, *spec.size, batch=batch, frames=frames or (2 if spec.video else 1))


def _prompts(arch: str) -> tuple[list, list]:
    return conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2)


def _assert_close(out: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-4) -> None:
    error = (out - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max error {error:.3g} vs scale {expected.abs().max().item():.3g}"


def _report(model):
    return patching.patch_of(model).last_report


def _guided(model, guider_class, conds: tuple, cfg: tuple, latent: dict, sampler: str = "euler") -> torch.Tensor:
    """Sample through a guider object, as SamplerCustomAdvanced does."""
    guider = guider_class(model)
    guider.set_conds(*conds)
    guider.set_cfg(*cfg)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=0)


WINDOW_AND_SHARING = [
    {"technique": "window", "tokens": 3, "refresh_every": 2},
    {"technique": "step", "compute_every": 2, "start": 0.5},
    {"technique": "cfg", "end": 0.75},
]


# 1. cross-attention is never touched ------------------------------------------------------------

@pytest.mark.parametrize("arch", ["wan", "pixart", "hunyuan_dit"])
def test_cross_attention_is_never_shared(arch):
    """CFG sharing on every layer of a model whose text enters only through cross-attention must
    not turn CFG off: cross layers stand aside, self-attention layers share."""
    model = build_model(arch)
    positive, negative = _prompts(arch)
    plain = sample(model, positive, negative, _latent(arch), steps=STEPS)
    cfg_one = sample(model, positive, negative, _latent(arch), steps=STEPS, cfg=1.0)
    chain = [{"technique": "cfg"}]
    patched = patched_with_nodes(model, chain)
    out = sample(patched, positive, negative, _latent(arch), steps=STEPS)
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=STEPS))
    assert (out - cfg_one).abs().max() > 0.1  # CFG still acts (the bug made this 1e-6)
    report = _report(patched)
    assert report.stood_aside["cross-attention (the techniques act on self-attention only)"] == STEPS * 2
    assert "full + cfg sharing" in report.flops_by_technique

    cross_only = patched_with_nodes(model, [{"technique": "cfg", "layers": "1"}, {"technique": "step", "layers": "3"}])
    assert torch.equal(sample(cross_only, positive, negative, _latent(arch), steps=STEPS), plain)


# 2. guiders with more than two conditionings ---------------------------------------------------

def test_dual_cfg_guider_gets_no_cfg_sharing_and_keeps_its_caches_apart():
    arch = "sd3"
    model = build_model(arch)
    first, negative = _prompts(arch)
    middle = conditioning(arch, 7, seed=3)
    conds, cfg = (first, middle, negative), (3.0, 2.0)
    plain = _guided(model, nodes_custom_sampler.Guider_DualCFG, conds, cfg, _latent(arch))
    cfg_only = patched_with_nodes(model, [{"technique": "cfg"}])
    assert torch.equal(_guided(cfg_only, nodes_custom_sampler.Guider_DualCFG, conds, cfg, _latent(arch)), plain)
    assert "CFG sharing needs ComfyUI's CFG guider" in next(iter(_report(cfg_only).stood_aside))

    out = _guided(patched_with_nodes(model, WINDOW_AND_SHARING), nodes_custom_sampler.Guider_DualCFG, conds, cfg,
                  _latent(arch))
    reference = reference_model(model, WINDOW_AND_SHARING, arch, cfg_guider=False)
    _assert_close(out, _guided(reference, nodes_custom_sampler.Guider_DualCFG, conds, cfg, _latent(arch)))


def test_perp_neg_guider_gets_no_cfg_sharing():
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    empty = conditioning(arch, 7, seed=4)
    conds, cfg = (positive, negative, empty), (3.0, 1.0)
    plain = _guided(model, nodes_perpneg.Guider_PerpNeg, conds, cfg, _latent(arch))
    cfg_only = patched_with_nodes(model, [{"technique": "cfg"}])
    assert torch.equal(_guided(cfg_only, nodes_perpneg.Guider_PerpNeg, conds, cfg, _latent(arch)), plain)
    out = _guided(patched_with_nodes(model, WINDOW_AND_SHARING), nodes_perpneg.Guider_PerpNeg, conds, cfg, _latent(arch))
    reference = reference_model(model, WINDOW_AND_SHARING, arch, cfg_guider=False)
    _assert_close(out, _guided(reference, nodes_perpneg.Guider_PerpNeg, conds, cfg, _latent(arch)))


# 3. more than one model call per step ----------------------------------------------------------

@pytest.mark.parametrize("node", [nodes_slg.SkipLayerGuidanceDiT, nodes_slg.SkipLayerGuidanceDiTSimple])
def test_skip_layer_guidance_forward_is_left_alone(node):
    """SLG's forwards with blocks skipped number their attention layers differently: no technique
    touches them, and the normal forwards keep their own caches."""
    arch = "sd3"
    model = build_model(arch)
    if node is nodes_slg.SkipLayerGuidanceDiT:
        model = node.execute(model, 3.0, 0.0, 1.0, double_layers="1").result[0]
    else:
        model = node.execute(model, 0.0, 1.0, double_layers="1").result[0]
    positive, negative = _prompts(arch)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    out = sample(patched, positive, negative, _latent(arch), steps=STEPS)
    reference = sample(reference_model(model, WINDOW_AND_SHARING, arch), positive, negative, _latent(arch), steps=STEPS)
    _assert_close(out, reference)
    report = _report(patched)
    assert any("Skip Layer Guidance" in reason for reason in report.stood_aside)
    assert report.layers_per_forward == {3, 2}  # the skipped block's attention is missing from SLG's forwards


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_second_order_samplers(sampler):
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    out = _guided(patched, comfy.samplers.CFGGuider, (positive, negative), (3.0,), _latent(arch), sampler)
    reference = reference_model(model, WINDOW_AND_SHARING, arch)
    _assert_close(out, _guided(reference, comfy.samplers.CFGGuider, (positive, negative), (3.0,), _latent(arch), sampler))
    assert _report(patched).forwards == 2 * STEPS - 1  # the last step is a plain Euler step


def test_context_windows_keep_a_cache_per_window():
    arch = "wan"
    model = nodes_context_windows.ContextWindowsManualNode.execute(
        build_model(arch), 2, 1, comfy.context_windows.ContextSchedules.STATIC_STANDARD, 1, False,
        comfy.context_windows.ContextFuseMethods.PYRAMID, 2).result[0]
    positive, negative = _prompts(arch)
    latent = _latent(arch, frames=4)
    chain = [{"technique": "window", "shape": "square", "tokens": 1}, {"technique": "step", "start": 0.5}]
    patched = patched_with_nodes(model, chain)
    out = sample(patched, positive, negative, latent, steps=STEPS)
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, latent, steps=STEPS))
    report = _report(patched)
    assert report.forwards == STEPS * 3  # three windows of 2 frames over 4, overlap 1
    assert {"window+residual", "step sharing"} <= set(report.flops_by_technique)


# 4. conditionings: areas, several prompts, no uuids --------------------------------------------

def test_area_conditioning_copies_cfg_only_between_equal_inputs():
    arch = "sd3"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    left = node_helpers.conditioning_set_values(positive, {"area": (16, 8, 0, 0), "strength": 1.0,
                                                           "set_area_to_bounds": False})
    prompts = (left + conditioning(arch, 7, seed=5), negative)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    out = sample(patched, *prompts, _latent(arch), steps=STEPS)
    _assert_close(out, sample(reference_model(model, WINDOW_AND_SHARING, arch), *prompts, _latent(arch), steps=STEPS))


def test_two_positive_prompts_combined():
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    prompts = (positive + conditioning(arch, 7, seed=6), negative)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    out = sample(patched, *prompts, _latent(arch), steps=STEPS)
    _assert_close(out, sample(reference_model(model, WINDOW_AND_SHARING, arch), *prompts, _latent(arch), steps=STEPS))


def test_chunks_without_uuids_get_distinct_identities():
    runtime, cache = pack_import("patching.runtime"), pack_import("patching.cache")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = runtime.SamplingRun(patching.AttentionPatch(None, adapter), linear_timeline(2))
    ids = cache.chunk_ids(run.evaluation_of, 0, (0, 0, 1), {}, torch.device("cpu"))
    assert len(set(ids)) == 3
    on_other_device = cache.chunk_ids(run.evaluation_of, 0, (0, 0, 1), {}, torch.device("meta"))
    assert not set(ids) & set(on_other_device)  # MultiGPU CFG split: halves on two devices never share


# 5. masks --------------------------------------------------------------------------------------

def test_hunyuan_video_text_padding_mask_keeps_the_window():
    arch = "hunyuan_video"
    model = build_model(arch)
    positive, negative = conditioning(arch, 7, seed=1), conditioning(arch, 5, seed=2)
    positive[0][1]["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    negative[0][1]["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0]])
    chain = [{"technique": "window", "tokens": 5}, {"technique": "cfg"}]
    patched = patched_with_nodes(model, chain)
    out = sample(patched, positive, negative, _latent(arch), steps=STEPS)
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=STEPS))
    report = _report(patched)
    assert "window+residual" in report.flops_by_technique
    assert not any("mask" in reason for reason in report.stood_aside)


# the randomized check --------------------------------------------------------------------------

def _random_chain(rng: random.Random, layers: int) -> list[dict]:
    chain = []
    for _ in range(rng.randint(1, 4)):
        start = rng.choice([0.0, 0.25, 0.5])
        spec = {"technique": rng.choice(["window", "step", "cfg"]), "start": start,
                "end": rng.choice([e for e in (0.5, 0.75, 1.0) if e > start]),
                "layers": rng.choice(["", "", f"0-{rng.randrange(layers)}", str(rng.randrange(layers))])}
        if spec["technique"] == "window":
            spec.update(shape=rng.choice(["band", "square", "circle"]), tokens=rng.randint(1, 4),
                        refresh_every=rng.randint(2, 3), residual=rng.random() < 0.8)
        elif spec["technique"] == "step":
            spec["compute_every"] = rng.randint(2, 3)
        chain.append(spec)
    return chain


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_random_chains_match_the_reference(arch):
    rng = random.Random(f"chains-{arch}")
    model = build_model(arch)
    positive, negative = _prompts(arch)
    layers = sum(expected_layers(arch).values())
    for batch, cfg in ((1, 3.0), (2, 3.0), (1, 1.0)):
        chain = _random_chain(rng, layers)
        latent = _latent(arch, batch=batch)
        out = sample(patched_with_nodes(model, chain), positive, negative, latent, steps=STEPS, cfg=cfg)
        reference = sample(reference_model(model, chain, arch), positive, negative, latent, steps=STEPS, cfg=cfg)
        _assert_close(out, reference)


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch not in CORE_ARCHITECTURES])
def test_windows_and_sharing_match_the_reference_on_the_other_architectures(arch):
    """The other architectures take the host paths the core seven take (batching, guiders); what is
    theirs is the layout: a square window on the grid (its place after or before the text, its rows and
    frames), then step and CFG sharing."""
    model = build_model(arch)
    positive, negative = _prompts(arch)
    chain = [{"technique": "window", "shape": "square", "tokens": 1, "refresh_every": 2}, *WINDOW_AND_SHARING[1:]]
    patched = patched_with_nodes(model, chain)
    out = sample(patched, positive, negative, _latent(arch), steps=STEPS)
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=STEPS))
    techniques = _report(patched).flops_by_technique
    assert "step sharing" in techniques and any(name.startswith("window+residual") for name in techniques)


# 6. what newer hosts pass to the override --------------------------------------------------------

def _one_call(method, func, q, k, v, heads: int, **kwargs):
    """One attention call through `method` as the runtime makes it: an image-only call on a 4 x 6 grid."""
    call_module, report, runtime = (pack_import(f"patching.{name}") for name in ("call", "report", "runtime"))
    kernels = pack_import("kernels")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = runtime.SamplingRun(patching.AttentionPatch(method, adapter), linear_timeline(2))
    site = report.CallSite(1, linear_timeline(2), 0, "image", kernels.TokenLayout(0, (4, 6)), (0,), (("c", (), "cpu", 0),), (0,),
                           (torch.zeros(1),))
    call = call_module.AttentionCall(func, (q, k, v, heads), {"skip_reshape": True, "skip_output_reshape": True,
                                                             **kwargs}, None)
    out, _, technique = method(call, site, run)
    return out, technique, run.report.stood_aside


def _sdpa(q, k, v, heads, scale=None, enable_gqa=False, **kwargs):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)


def test_new_override_arguments_are_honoured_or_stood_aside_for():
    schedule_module = pack_import("patching.schedule")
    window_only = schedule_module.Schedule((schedule_module.WindowResidual(
        schedule_module.WindowSize("band", fraction=1.0), refresh_every=2, residual=False),))
    method = pack_import("patching.ditfastattn").DiTFastAttn(window_only, backend="torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 16, generator=gen) for _ in range(3))

    out, technique, _ = _one_call(method, _sdpa, q, k, v, 4, scale=0.3, low_precision_attention=False)
    assert technique == "window"
    _assert_close(out, _sdpa(q, k, v, 4, scale=0.3), 1e-5)

    k2, v2 = k[:, :2], v[:, :2]  # grouped-query attention: 2 key/value heads for 4 query heads
    out, technique, _ = _one_call(method, _sdpa, q, k2, v2, 4, enable_gqa=True)
    assert technique == "window"
    _assert_close(out, _sdpa(q, k2, v2, 4, enable_gqa=True), 1e-5)

    class Container:  # a newer host's tensor container: only the host's own backend can read it
        def __init__(self, tensor):
            self.tensor = tensor
            self.shape = tensor.shape

    def unwrapping(q, k, v, heads, **kwargs):
        return _sdpa(q.tensor, k.tensor, v.tensor, heads)

    out, technique, stood_aside = _one_call(method, unwrapping, Container(q), Container(k), Container(v), 4)
    assert technique == "full" and list(stood_aside) == ["q/k/v passed as tensor containers"]
    assert torch.equal(out, _sdpa(q, k, v, 4))

    out, technique, stood_aside = _one_call(method, _sdpa, q, k, v, 4, cu_seqlens=None)
    assert technique == "full" and list(stood_aside) == ["unknown attention arguments cu_seqlens"]


def test_a_text_only_call_as_long_as_the_image_is_not_taken_for_image():
    runtime = pack_import("patching.runtime")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = runtime.SamplingRun(patching.AttentionPatch(None, adapter), linear_timeline(1))
    forward = runtime.ForwardPass(run, 0, (0,), ("c",), grid=(4, 4), text_len=16, previous_override=None)
    assert forward._classify(16, 16) == ("unknown", None)
    assert forward._classify(32, 32)[0] == "joint"


def test_overlapping_window_nodes_keep_each_residual_with_its_window():
    arch = "sd3"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    chain = [{"technique": "window", "tokens": 2, "refresh_every": 3},
             {"technique": "window", "shape": "square", "tokens": 1, "refresh_every": 2, "start": 0.25, "end": 0.75}]
    out = sample(patched_with_nodes(model, chain), positive, negative, _latent(arch), steps=6)
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=6))


def test_objects_without_a_shape_run_as_the_host_runs_them():
    runtime = pack_import("patching.runtime")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = runtime.SamplingRun(patching.AttentionPatch(None, adapter), linear_timeline(1))
    forward = runtime.ForwardPass(run, 0, (0,), ("c",), grid=(4, 6), text_len=0, previous_override=None)
    q = torch.randn(1, 2, 24, 8)
    opaque = type("Opaque", (), {"tensor": q})()
    out = forward(lambda q, k, v, heads, **kwargs: q.tensor * 2, opaque, opaque, opaque, 2, transformer_options={})
    assert torch.equal(out, q * 2) and forward.layers == 1
    assert run.report.stood_aside == {"q/k/v passed as objects without a shape": 1}


def test_sampling_on_a_gpu_without_triton_runs_the_torch_tiles(monkeypatch):
    """A non-CPU device without Triton, simulated: every window call resolves "auto" for a CUDA device
    while Triton is missing. Sampling runs the torch tiles from the first call on, no exception, and
    gives the reference's result."""
    backends, attention = pack_import("kernels.backends"), pack_import("kernels.attention")
    monkeypatch.setattr(backends, "_importable", lambda needs: needs != "triton")
    backends._device_backend.cache_clear()
    chosen = []

    def on_a_gpu(name, device):
        chosen.append(backends.choose_backend(name, torch.device("cuda")))
        return chosen[-1]

    monkeypatch.setattr(attention, "choose_backend", on_a_gpu)
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    chain = [{"technique": "window", "shape": "circle", "tokens": 3}, {"technique": "cfg"}]
    try:
        out = sample(patched_with_nodes(model, chain), positive, negative, _latent(arch), steps=STEPS)
    finally:
        backends._device_backend.cache_clear()
    assert chosen and set(chosen) == {"torch"}
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=STEPS))
