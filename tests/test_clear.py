"""CLEAR: the local-attention technique on ComfyUI's models, and CLEAR's FLUX weights as patches."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import folder_paths
import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, linear_timeline, sample
from safetensors.torch import save_file

patching = pack_import("patching")
S = pack_import("patching.schedule")
kernels = pack_import("kernels")
DiTFastAttn = pack_import("patching.ditfastattn").DiTFastAttn
clear_nodes = pack_import("nodes.clear")
ClearWeightsError = pack_import("patching.clear_weights").ClearWeightsError

STEPS = 3
SIZE = {"flux": (16, 16, 1), "sd3": (16, 16, 1), "wan": (8, 12, 3)}


def _latent(arch: str) -> dict:
    height, width, frames = SIZE[arch]
    return empty_latent(arch, height, width, frames=frames)


def _run(model, arch: str) -> torch.Tensor:
    return sample(model, conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), _latent(arch), steps=STEPS)


class Spy:
    """Wraps the method; records each call's site, technique, output and the call itself."""

    def __init__(self, method) -> None:
        self.method = method
        self.records: list[tuple] = []

    def __call__(self, call, site, run):
        out, flops, technique = self.method(call, site, run)
        self.records.append((site, technique, out.clone(), call))
        return out, flops, technique


def _spied(model, *techniques) -> tuple:
    spy = Spy(DiTFastAttn(S.Schedule(techniques)))
    return patching.install(model, spy), spy


def test_local_attention_is_a_window_without_residual_at_every_covered_step():
    local = S.LocalAttention(S.WindowSize("circle", tokens=4), S.Scope(S.NoiseRange(0.25, 1.0), kept_full=frozenset({2})))
    sched = S.Schedule((local, S.CFGSharing()))
    timeline = linear_timeline(4)
    choices = [sched.choose(step, timeline, 0) for step in range(4)]
    assert [c.compute for c in choices] == ["full", "window", "window", "window"]
    assert all(c.share_cfg and not c.residual for c in choices[1:])
    assert sched.choose(2, timeline, 2).compute == "full"  # kept full
    assert sched.residual_window(0, timeline, 0) is None  # nothing to cache for a plain window
    later = S.Schedule((local, S.WindowResidual(S.WindowSize("band"), refresh_every=2)))
    assert later.choose(1, timeline, 0).residual  # the later window technique wins
    with pytest.raises(ValueError, match="circle or square"):
        S.LocalAttention(S.WindowSize("band"))
    with pytest.raises(ValueError, match="pool must be"):
        S.WindowSize("circle", pool=1)


@pytest.mark.parametrize("arch", ["flux", "wan"])
def test_radius_covering_the_grid_equals_full_attention(arch):
    model = build_model(arch)
    reference = _run(model, arch)
    window = S.WindowSize("circle", tokens=64, temporal_tokens=8)
    patched, spy = _spied(model, S.LocalAttention(window))
    out = _run(patched, arch)
    techniques = {(site.kind, technique) for site, technique, _, _ in spy.records}
    assert ("joint" if arch == "flux" else "image", "window") in techniques
    if arch == "wan":
        assert ("cross", "full") in techniques  # cross-attention is never touched
    assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()


@pytest.mark.parametrize(("arch", "pool"), [("flux", 0), ("flux", 4), ("sd3", 2), ("wan", 2)])
def test_each_call_is_the_dense_reference_and_text_queries_see_everything(arch, pool):
    """Every window call equals the dense masked reference in float64 (circle, text keys,
    pooled keys as kernels/reference.py defines them); the text rows of joint calls equal
    full attention."""
    weights = S.PoolWeights({0: torch.arange(1.0, pool * pool + 1) / 10}) if pool else None
    window = S.WindowSize("circle", tokens=2, temporal_tokens=1, pool=pool)
    patched, spy = _spied(build_model(arch), S.LocalAttention(window, pool_weights=weights))
    _run(patched, arch)
    checked = checked_text = 0
    for site, technique, out, call in spy.records:
        if site.kind not in ("joint", "image"):
            assert technique == "full"
            continue
        assert technique == "window"
        q, k, v = (t.double() for t in call.heads_first())
        pool_weight = weights.get(site.layer) if weights else None
        expected = kernels.reference_attention(q, k, v, site.layout, window.window_for(site.layout),
                                               pool_weight=pool_weight)
        got = call.output_heads_first(out).double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        if site.layout.text_len:
            text = slice(site.layout.text_start, site.layout.text_start + site.layout.text_len)
            full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            assert (got[:, :, text] - full[:, :, text]).abs().max() <= 1e-4 * full.abs().max()
            checked_text += 1
        checked += 1
    assert checked >= STEPS and checked_text >= (STEPS if arch != "wan" else 0)


def test_node_chains_with_dit_fast_attn_and_leaves_the_input_model_alone():
    model = build_model("flux")
    local = clear_nodes.ClearAttention.execute(model, 0, 0.25, "2 x 2", 1, 0.0, 1.0, "1").result[0]
    chained = pack_import("nodes.ditfastattn").CFGSharingAttention.execute(local, 0.0, 1.0, "").result[0]
    techniques = patching.patch_of(chained).method.schedule.techniques
    assert [type(t).__name__ for t in techniques] == ["LocalAttention", "CFGSharing"]
    assert techniques[0].window == S.WindowSize("circle", 0.25, 0, temporal_tokens=1, pool=2)
    assert techniques[0].scope.kept_full == frozenset({1})
    assert patching.patch_of(model) is None
    out = _run(chained, "flux")
    assert set(patching.patch_of(chained).last_report.flops_by_technique) == {"window + cfg sharing",
                                                                               "full + cfg sharing"}
    plain = _run(model, "flux")
    assert (out - plain).abs().max() > 1e-4 * plain.abs().max()


# ---- CLEAR weights on ComfyUI's fused FLUX layout ----

HIDDEN, DOUBLE, SINGLE = 128, 2, 2


@pytest.fixture(scope="module")
def flux():
    return build_model("flux", depth=DOUBLE, depth_single_blocks=SINGLE)


def _clear_file(pool: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic CLEAR file in diffusers naming, as the released ones are laid out."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, names in ((f"transformer_blocks.{n}.attn.", ("to_q", "to_k", "to_v", "to_out.0")) for n in range(DOUBLE)):
        tensors.update(_projections(prefix, names, gen))
    for n in range(SINGLE):
        tensors.update(_projections(f"single_transformer_blocks.{n}.attn.", ("to_q", "to_k", "to_v"), gen))
    if pool:
        for prefix in [f"transformer_blocks.{n}." for n in range(DOUBLE)] + [f"single_transformer_blocks.{n}."
                                                                           for n in range(SINGLE)]:
            tensors[f"{prefix}attn.processor.spatial_weight"] = torch.rand((1, 1, 1, pool, 1, pool, 1), generator=gen)
    return tensors


def _projections(prefix: str, names: tuple[str, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        out[f"{prefix}{name}.weight"] = torch.randn((HIDDEN, HIDDEN), generator=gen)
        out[f"{prefix}{name}.bias"] = torch.randn((HIDDEN,), generator=gen)
    return out


def _write(tmp_path, name: str, tensors: dict, metadata: dict | None = None) -> str:
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def test_loaded_weights_sit_at_the_right_rows_and_unload_cleanly(flux, tmp_path):
    tensors = _clear_file(pool=4)
    before = {k: v.clone() for k, v in flux.model.diffusion_model.state_dict().items()}
    patched = clear_nodes.load_clear(flux, _write(tmp_path, "clear_local_16_down_4.safetensors", tensors))
    (local,) = patching.patch_of(patched).method.schedule.techniques
    assert local.window == S.WindowSize("circle", tokens=16, temporal_tokens=1, pool=4)
    assert torch.equal(local.pool_weights.get(DOUBLE + 1), tensors["single_transformer_blocks.1.attn.processor.spatial_weight"].flatten())
    patched.patch_model()
    try:
        weights = patched.model.diffusion_model.state_dict()
        h = HIDDEN
        for n in range(DOUBLE):
            for end in ("weight", "bias"):
                qkv = weights[f"double_blocks.{n}.img_attn.qkv.{end}"]
                for i, name in enumerate(("to_q", "to_k", "to_v")):
                    assert torch.equal(qkv[i * h:(i + 1) * h], tensors[f"transformer_blocks.{n}.attn.{name}.{end}"])
                assert torch.equal(weights[f"double_blocks.{n}.img_attn.proj.{end}"],
                                   tensors[f"transformer_blocks.{n}.attn.to_out.0.{end}"])
                assert torch.equal(weights[f"double_blocks.{n}.txt_attn.qkv.{end}"],
                                   before[f"double_blocks.{n}.txt_attn.qkv.{end}"])  # text stream untouched
        for n in range(SINGLE):
            for end in ("weight", "bias"):
                linear1 = weights[f"single_blocks.{n}.linear1.{end}"]
                for i, name in enumerate(("to_q", "to_k", "to_v")):
                    expected = tensors[f"single_transformer_blocks.{n}.attn.{name}.{end}"]
                    assert torch.equal(linear1[i * h:(i + 1) * h], expected)
                assert torch.equal(linear1[3 * h:], before[f"single_blocks.{n}.linear1.{end}"][3 * h:])  # MLP rows
    finally:
        patched.unpatch_model()
    after = flux.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert patching.patch_of(flux) is None and not flux.patches


@torch.no_grad()
def _written_in(model, tensors: dict[str, torch.Tensor]):
    """`model` with a CLEAR file's projections written into its weights by hand: q, k, v as the first
    three blocks of rows of the fused image-stream qkv (and of a single block's linear1), to_out as
    the image stream's proj."""
    net, h = model.model.diffusion_model, HIDDEN
    for n in range(DOUBLE):
        for end in ("weight", "bias"):
            qkv = getattr(net.double_blocks[n].img_attn.qkv, end)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                qkv[i * h:(i + 1) * h] = tensors[f"transformer_blocks.{n}.attn.{name}.{end}"]
            getattr(net.double_blocks[n].img_attn.proj, end).copy_(tensors[f"transformer_blocks.{n}.attn.to_out.0.{end}"])
    for n in range(SINGLE):
        for end in ("weight", "bias"):
            linear1 = getattr(net.single_blocks[n].linear1, end)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                linear1[i * h:(i + 1) * h] = tensors[f"single_transformer_blocks.{n}.attn.{name}.{end}"]
    return model


def test_loaded_model_samples_with_the_file_weights_and_pooling(flux, tmp_path):
    """The loaded model samples as the same FLUX with the file's projections written in by hand and
    CLEAR's local attention at the file's radius (3) and pooling (2 x 2, the file's weights per layer);
    the weights, the window and the pooling each change the output."""
    tensors = _clear_file(pool=2, seed=1)
    path = _write(tmp_path, "distilled.safetensors", tensors, metadata={"clear_radius": "3", "clear_pool": "2"})
    patched = clear_nodes.load_clear(flux, path)
    out = _run(patched, "flux")
    assert set(patching.patch_of(patched).last_report.flops_by_technique) == {"window"}

    by_hand = _written_in(build_model("flux", depth=DOUBLE, depth_single_blocks=SINGLE), tensors)
    prefixes = [f"transformer_blocks.{n}." for n in range(DOUBLE)] + [f"single_transformer_blocks.{n}."
                                                                     for n in range(SINGLE)]
    weights = S.PoolWeights({layer: tensors[f"{prefix}attn.processor.spatial_weight"].flatten()
                             for layer, prefix in enumerate(prefixes)})

    def local(pool: int, pool_weights=None):
        window = S.WindowSize("circle", tokens=3, temporal_tokens=1, pool=pool)
        return patching.install(by_hand, DiTFastAttn(S.Schedule((S.LocalAttention(window, pool_weights=pool_weights),))))

    expected = _run(local(2, weights), "flux")
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    for other in (_run(flux, "flux"), _run(by_hand, "flux"), _run(local(2), "flux"), _run(local(0), "flux")):
        assert (out - other).abs().max() > 1e-4 * other.abs().max()


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("single_transformer_blocks.1.attn.to_v.bias"), "1 of its projections missing"),
    (lambda t: t.update({"transformer_blocks.5.attn.to_q.weight": torch.zeros(HIDDEN, HIDDEN)}), "1 names it lacks"),
    (lambda t: t.update({"transformer_blocks.0.attn.to_q.weight": torch.zeros(HIDDEN, 2 * HIDDEN)}), "needs \\(128, 128\\)"),
    (lambda t: t.update({"transformer_blocks.0.norm1.linear.weight": torch.zeros(1)}), "not a CLEAR weight"),
])
def test_bad_files_are_rejected_clearly(flux, tmp_path, change, message):
    tensors = _clear_file()
    change(tensors)
    with pytest.raises(ClearWeightsError, match=message):
        clear_nodes.load_clear(flux, _write(tmp_path, "clear_local_8.safetensors", tensors))


def test_radius_and_pooling_must_match_the_file(flux, tmp_path):
    with pytest.raises(ClearWeightsError, match="trained for radius 8, not 16"):
        clear_nodes.load_clear(flux, _write(tmp_path, "clear_local_8.safetensors", _clear_file()), radius=16)
    with pytest.raises(ClearWeightsError, match="set the radius input"):
        clear_nodes.load_clear(flux, _write(tmp_path, "mine.safetensors", _clear_file()))
    with pytest.raises(ClearWeightsError, match="says pooling 4 but holds spatial weights for none"):
        clear_nodes.load_clear(flux, _write(tmp_path, "clear_local_8_down_4.safetensors", _clear_file()))
    assert clear_nodes.load_clear(flux, _write(tmp_path, "mine.safetensors", _clear_file()), radius=5) is not flux
    with pytest.raises(ClearWeightsError, match="for FLUX models"):
        clear_nodes.load_clear(build_model("sd3"), _write(tmp_path, "clear_local_8.safetensors", _clear_file()))


# ---- distillation ----

distillation = pack_import("patching.clear_distill")


def _distil(model, arch: str, tmp_path, settings, start=None, on_loss=lambda step, loss: None) -> tuple[str, torch.Tensor]:
    """Teacher samples at the test size, then distillation; returns the file and the samples."""
    node = clear_nodes
    latent = {"samples": torch.zeros_like(_latent(arch)["samples"]).repeat(2, 1, 1, 1)}
    samples = node.teacher_samples(model, conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), latent,
                                   seed=0, steps=STEPS, cfg=3.0)
    path = str(tmp_path / f"distilled_{settings.iterations}.safetensors")
    with torch.inference_mode():  # as ComfyUI runs nodes
        distillation.distill(model, conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), 3.0, samples, settings,
                             lambda tensors, metadata: save_file(tensors, path, metadata=metadata), start, on_loss)
    return path, samples


def test_distillation_brings_the_student_closer_to_the_teacher(tmp_path):
    arch = "sd3"
    model = build_model(arch)
    teacher = _run(model, arch)
    zero_shot = _run(clear_nodes.ClearAttention.execute(model, 2, 0.25, "off", 1, 0.0, 1.0, "").result[0], arch)
    # a random model does not predict its data: only the teacher terms (CLEAR's flow matching is off)
    settings = distillation.DistillSettings(radius=2, iterations=40, learning_rate=3e-4, flow_matching=0.0)
    path, _ = _distil(model, arch, tmp_path, settings)
    distilled_model = clear_nodes.load_clear(model, path)
    distilled = _run(distilled_model, arch)
    error = lambda x: (x - teacher).pow(2).mean().item()  # noqa: E731
    assert error(distilled) < 0.8 * error(zero_shot)
    (local,) = patching.patch_of(distilled_model).method.schedule.techniques
    assert local.window == S.WindowSize("circle", tokens=2, temporal_tokens=1)


def test_distilled_file_holds_the_attention_projections_and_pooling_and_resumes(tmp_path):
    arch = "sd3"
    with torch.inference_mode():  # as ComfyUI runs its loaders: the weights are inference tensors
        model = build_model(arch)
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    path, _ = _distil(model, arch, tmp_path, distillation.DistillSettings(radius=2, pool=2, iterations=2,
                                                                          learning_rate=1e-3))
    weights = pack_import("patching.clear_weights").read_clear_file(path)
    assert weights.native and weights.radius == 2 and weights.pool == 2
    assert sorted(weights.pool_weights) == ["0", "1", "2"]  # every windowed layer trained its pooling
    assert not any(torch.equal(w, torch.full((4,), 0.25)) for w in weights.pool_weights.values())
    assert weights.projections and all(".x_block.attn" in key for key in weights.projections)
    assert not any(torch.equal(tensor, base[key]) for key, tensor in weights.projections.items())
    assert all(torch.equal(v, model.model_state_dict()[k]) for k, v in base.items())  # the model is untouched
    start = {**weights.projections, **{f"fastattn.pool_weight.{k}": v for k, v in weights.pool_weights.items()}}
    resumed, _ = _distil(model, arch, tmp_path, distillation.DistillSettings(radius=2, pool=2, iterations=1),
                         start=start)
    loaded = clear_nodes.load_clear(model, resumed)
    assert patching.patch_of(loaded).method.schedule.techniques[0].window.pool == 2
    with pytest.raises(ClearWeightsError, match="distilled for a OpenAISignatureMMDITWrapper model, not this Flux"):
        clear_nodes.load_clear(build_model("flux"), resumed)


def test_distillation_of_flux_trains_and_its_file_loads(flux, tmp_path, monkeypatch):
    """FLUX blocks add to their input in place; the student runs them with out-of-place residual adds,
    so the image-stream projections and the single blocks' q/k/v rows train (on the same seeded draws
    of latents, sigmas and noise, the loss falls below the untrained student's), and the file loads."""
    base = {k: v.clone() for k, v in flux.model_state_dict().items()}
    untrained, trained = [], []
    for rate, losses in ((0.0, untrained), (3e-4, trained)):
        settings = distillation.DistillSettings(radius=2, pool=2, iterations=12, learning_rate=rate, flow_matching=0.0)
        path, _ = _distil(flux, "flux", tmp_path, settings, on_loss=lambda step, loss, losses=losses: losses.append(loss))
    assert trained[0] == pytest.approx(untrained[0], rel=1e-6)  # the same draws, before the first update
    assert all(t < u for t, u in zip(trained[1:], untrained[1:], strict=True)), (trained, untrained)
    assert sum(trained[-6:]) < 0.8 * sum(untrained[-6:]), (trained, untrained)
    weights = pack_import("patching.clear_weights").read_clear_file(path)
    assert weights.native and weights.radius == 2 and weights.pool == 2 and len(weights.pool_weights) == DOUBLE + SINGLE
    keys = {f"diffusion_model.{name}.{end}" for end in ("weight", "bias") for name in
            [f"double_blocks.{n}.img_attn.{p}" for n in range(DOUBLE) for p in ("qkv", "proj")]
            + [f"single_blocks.{n}.linear1" for n in range(SINGLE)]}
    assert set(weights.projections) == keys  # the image stream and the single blocks' q/k/v, no text stream
    rows = weights.projections["diffusion_model.single_blocks.0.linear1.weight"]
    assert rows.shape == (3 * HIDDEN, HIDDEN) and not torch.equal(rows, base["diffusion_model.single_blocks.0.linear1.weight"][:3 * HIDDEN])
    assert all(torch.equal(v, flux.model_state_dict()[k]) for k, v in base.items())  # the model is untouched

    monkeypatch.setitem(folder_paths.folder_names_and_paths, clear_nodes.CLEAR_FOLDER, ([str(tmp_path)], {".safetensors"}))
    loader = clear_nodes.ClearWeightsLoader  # the node, as a workflow runs it, radius from the file
    (loaded,) = loader.execute(flux, Path(path).name, 0, 1, 0.0, 1.0, "").result
    comfy.model_management.unload_all_models()  # as ComfyUI does before loading another patcher of the model
    loaded.patch_model()
    try:
        patched = loaded.model.diffusion_model.state_dict()
        linear1 = patched["single_blocks.0.linear1.weight"]
        assert torch.equal(linear1[:3 * HIDDEN], rows)
        assert torch.equal(linear1[3 * HIDDEN:], base["diffusion_model.single_blocks.0.linear1.weight"][3 * HIDDEN:])
    finally:
        loaded.unpatch_model()
    assert torch.isfinite(_run(loaded, "flux")).all()
    assert patching.patch_of(loaded).method.schedule.techniques[0].window.pool == 2


def test_distillation_of_other_architectures_is_refused_clearly():
    with pytest.raises(ValueError, match="trains SD3-class \\(MMDiT\\) and FLUX models; WanModel is not supported"):
        distillation.trainable_for(build_model("wan"))
