"""DeepCache on ComfyUI's own U-Net classes (SD 1.5 and SDXL layouts, small configs).

The node's samples are compared with the unpatched model (interval 1, or no step in the noise
range: bit for bit) and with `ReferenceDeepCache`, the 1:N schedule written here apart from the
pack: a loop over the host's U-Net blocks that keeps the feature entering the cached branch's
output block at full steps and, at the steps between, runs only the shallow blocks on top of it.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding
from harness import pack_import
from harness.models import UNET_ARCHITECTURES, build_controlnet, build_model, conditioning, empty_latent

deepcache = pack_import("patching.deepcache")
deepcache_schedule = pack_import("patching.deepcache_schedule")
nodes = pack_import("nodes.deepcache")
inspector_nodes = pack_import("nodes.inspector")
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
STEPS = 6


@pytest.fixture(scope="module", params=UNET_ARCHITECTURES)
def arch_model(request):
    return request.param, build_model(request.param)


def _prompts(arch: str) -> tuple[list, list]:
    return conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2)


def _sample(model, positive, negative, latent: dict, sampler: str = "euler", steps: int = STEPS,
            cfg: float = 3.0) -> torch.Tensor:
    noise = comfy.sample.prepare_noise(latent["samples"], 0)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", positive, negative, latent["samples"],
                               disable_pbar=True, seed=0)


def _deepcache(model, interval: int, depth: int = 0, start: float = 0.0, end: float = 1.0,
               schedule: str = "uniform"):
    return nodes.DeepCache.execute(model, interval, depth, start, end, schedule).result[0]


def _pop(control: dict | None, name: str) -> torch.Tensor | None:
    """The next ControlNet residual for a block of kind `name`, taken as the host takes them (last first)."""
    if control is None or not control.get(name):
        return None
    return control[name].pop()


def reference_forward(unet, x, timesteps, context, y, control, options, cached, depth):
    """The U-Net's blocks in the host's order; with `cached`, only input blocks 0..depth and output
    blocks from L-1-depth on, starting from `cached`. Returns (output, the feature entering output
    block L-1-depth, None when it was given)."""
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    entry = len(unet.input_blocks) - 1 - depth
    h, skips = x, []
    for index, block in enumerate(unet.input_blocks):
        residual = _pop(control, "input")
        if cached is not None and index > depth:
            skips.append(None)
            continue
        h = forward_timestep_embed(block, h, emb, context, options)
        skips.append(h if residual is None else h + residual)
        h = skips[-1]
    residual = _pop(control, "middle")
    if cached is None and unet.middle_block is not None:
        h = forward_timestep_embed(unet.middle_block, h, emb, context, options)
        h = h if residual is None else h + residual
    feature = None
    for index, block in enumerate(unet.output_blocks):
        skip, residual = skips.pop(), _pop(control, "output")
        if cached is not None and index < entry:
            continue
        if index == entry:
            feature, h = (h, h) if cached is None else (None, cached)
        skip = skip if residual is None else skip + residual
        h = forward_timestep_embed(block, torch.cat([h, skip], dim=1), emb, context, options,
                                   skips[-1].shape if skips else None)
    return unet.out(h.type(x.dtype)), feature


class ReferenceDeepCache:
    """The 1:N schedule: step i of the run (the last schedule sigma >= the call's sigma) is full when
    i % interval == 0 (uniform, whole range) or i is in `full`; a shallow call reads, per conditioning,
    the feature the same evaluation of that conditioning (first, second... call of the step) stored at
    the last full step, and runs full (storing) when one is missing."""

    def __init__(self, interval: int, depth: int, full: set[int] | None = None) -> None:
        self.interval, self.depth, self.full = interval, depth, full
        self.features: dict[tuple, torch.Tensor] = {}
        self.evaluations: dict[tuple, int] = {}
        self.calls: list[tuple[int, str]] = []  # (step, "full" / "shallow") per U-Net call

    def model(self, model):
        clone = model.clone()
        clone.add_wrapper_with_key(DIFFUSION_MODEL, "test_reference", self.wrapper)
        return clone

    def wrapper(self, executor, x, timesteps, context, y, control, options, **kwargs):
        sigmas = [float(s) for s in options["sample_sigmas"]]
        sigma = float(options["sigmas"][0])
        step = max(i for i, s in enumerate(sigmas[:-1]) if s >= sigma or i == 0)
        keys = []
        for index in options["cond_or_uncond"]:
            count = self.evaluations.get((step, index), 0)
            self.evaluations[(step, index)] = count + 1
            keys.append((index, count))
        full = step % self.interval == 0 if self.full is None else step in self.full
        cached = None
        if not full and all(key in self.features for key in keys):
            cached = torch.cat([self.features[key] for key in keys])
        out, feature = reference_forward(executor.class_obj, x, timesteps, context, y, control, options, cached,
                                         self.depth)
        if feature is not None:
            self.features.update(zip(keys, feature.chunk(len(keys)), strict=True))
        self.calls.append((step, "full" if cached is None else "shallow"))
        return out


def _blocks(unet) -> list[tuple[str, torch.nn.Module]]:
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
    blocks += [("middle_block", unet.middle_block)] if unet.middle_block is not None else []
    return blocks + [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]


def _shallow_blocks(unet, depth: int) -> set[str]:
    count = len(unet.input_blocks)
    return {f"input_blocks.{i}" for i in range(depth + 1)} | {f"output_blocks.{i}" for i in range(count - 1 - depth, count)}


def _record_blocks(model, run):
    """Run `run(model)` with every U-Net call's set of blocks that computed anything recorded (leaf
    modules' forward pre-hooks: a skipped layer's sub-modules never run)."""
    unet = model.model.diffusion_model
    ran: set[str] = set()
    per_call: list[frozenset[str]] = []
    handles = [leaf.register_forward_pre_hook(lambda *_, name=name: ran.add(name))
               for name, block in _blocks(unet) for leaf in block.modules() if not list(leaf.children())]

    def recorder(executor, *args, **kwargs):
        ran.clear()
        out = executor(*args, **kwargs)
        per_call.append(frozenset(ran))
        return out

    recording = model.clone()
    recording.add_wrapper_with_key(DIFFUSION_MODEL, "test_recorder", recorder)
    try:
        run(recording)
    finally:
        for handle in handles:
            handle.remove()
    return per_call


# 1. exactness ---------------------------------------------------------------------------------

def test_interval_one_and_an_empty_range_are_the_unpatched_model_bit_for_bit(arch_model):
    arch, model = arch_model
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    plain = _sample(model, positive, negative, latent)
    assert torch.equal(_sample(_deepcache(model, 1), positive, negative, latent), plain)
    assert torch.equal(_sample(_deepcache(model, 3, start=0.5, end=0.5), positive, negative, latent), plain)
    assert not torch.equal(_sample(_deepcache(model, 3), positive, negative, latent), plain)


@pytest.mark.parametrize(("interval", "depth"), [(2, 0), (3, 0), (3, 4)])
def test_matches_the_independent_reference_schedule(arch_model, interval, depth):
    arch, model = arch_model
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    reference = ReferenceDeepCache(interval, depth)
    expected = _sample(reference.model(model), positive, negative, latent)
    patched = _deepcache(model, interval, depth)
    assert torch.equal(_sample(patched, positive, negative, latent), expected)
    assert reference.calls == [(step, "full" if step % interval == 0 else "shallow") for step in range(STEPS)]
    report = deepcache.holder_of(patched).last_report
    shallow = sum(1 for _, kind in reference.calls if kind == "shallow")
    assert (report.full_calls, report.shallow_calls) == (STEPS - shallow, shallow)
    unet = model.model.diffusion_model
    skipped_per_call = len(_blocks(unet)) - len(_shallow_blocks(unet, depth))
    assert report.blocks_skipped == shallow * skipped_per_call


def test_shallow_calls_run_only_the_shallow_blocks(arch_model):
    arch, model = arch_model
    positive, negative = _prompts(arch)
    unet = model.model.diffusion_model
    every_block = {name for name, _ in _blocks(unet)}
    for depth in (0, 2):
        per_call = _record_blocks(_deepcache(model, 3, depth),
                                  lambda m: _sample(m, positive, negative, empty_latent(arch, 16, 16)))
        shallow = _shallow_blocks(unet, depth)
        assert per_call == [every_block if step % 3 == 0 else shallow for step in range(STEPS)]


def test_non_uniform_schedule_and_noise_range(arch_model):
    """start / end percent are noise levels: steps whose sigma is outside (end, start] run full;
    the non-uniform 1:N places the full steps among the active ones."""
    arch, model = arch_model
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    steps = 10
    sampling = model.get_model_object("model_sampling")
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(sampling, "simple", steps)]
    start, end = (float(sampling.percent_to_sigma(p)) for p in (0.2, 0.9))
    active = [i for i in range(steps) if end < sigmas[i] <= start]
    assert 0 < len(active) < steps  # the range leaves steps out on both sides
    positions = deepcache_schedule.full_positions(len(active), 3, "non-uniform")
    full = {i for i in range(steps) if i not in active} | {active[p] for p in positions}
    reference = ReferenceDeepCache(3, 0, full)
    expected = _sample(reference.model(model), positive, negative, latent, steps=steps)
    patched = _deepcache(model, 3, 0, 0.2, 0.9, "non-uniform")
    assert torch.equal(_sample(patched, positive, negative, latent, steps=steps), expected)
    assert {step for step, kind in reference.calls if kind == "shallow"} == set(active) - {active[p] for p in positions}


# 2. how the host calls the model ------------------------------------------------------------------

def test_cfg_in_one_batch_and_split_calls(arch_model, monkeypatch):
    arch, model = arch_model
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    patched = _deepcache(model, 2)
    batched = _sample(patched, positive, negative, latent)
    assert deepcache.holder_of(patched).last_report.full_calls == STEPS // 2  # one call per step: [uncond, cond]
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 0)  # no room to batch
    reference = ReferenceDeepCache(2, 0)
    split = _sample(patched, positive, negative, latent)
    assert torch.equal(split, _sample(reference.model(model), positive, negative, latent))
    report = deepcache.holder_of(patched).last_report
    assert (report.full_calls, report.shallow_calls, report.stood_aside) == (STEPS, STEPS, {})  # two calls per step
    assert (split - batched).abs().max() < 1e-3 * batched.abs().max()


def test_heun_second_calls_read_what_second_calls_stored(arch_model):
    arch, model = arch_model
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    reference = ReferenceDeepCache(2, 0)
    expected = _sample(reference.model(model), positive, negative, latent, sampler="heun")
    patched = _deepcache(model, 2)
    assert torch.equal(_sample(patched, positive, negative, latent, sampler="heun"), expected)
    # Heun's second call lands on the next step's sigma: step 1 then holds two evaluations, and its
    # second finds nothing stored by a second evaluation of step 0 (which had one): it runs full.
    assert reference.calls[:4] == [(0, "full"), (1, "shallow"), (1, "full"), (2, "full")]
    report = deepcache.holder_of(patched).last_report
    assert sum(report.stood_aside.values()) == 1
    assert report.full_calls + report.shallow_calls == len(reference.calls)


def test_no_state_across_runs_resolutions_and_batch_sizes(arch_model):
    arch, model = arch_model
    positive, negative = _prompts(arch)
    patched = _deepcache(model, 3)
    first = _sample(patched, positive, negative, empty_latent(arch, 16, 16))
    other = _sample(patched, positive, negative, empty_latent(arch, 24, 16, batch=2))
    assert torch.equal(other, _sample(_deepcache(model, 3), positive, negative, empty_latent(arch, 24, 16, batch=2)))
    assert torch.equal(_sample(patched, positive, negative, empty_latent(arch, 16, 16)), first)

    def interrupt(step, *args):
        if step == 2:
            raise comfy.model_management.InterruptProcessingException()

    noise = comfy.sample.prepare_noise(empty_latent(arch, 16, 16)["samples"], 0)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(patched, noise, STEPS, 3.0, "euler", "simple", positive, negative, torch.zeros_like(noise),
                            disable_pbar=True, seed=0, callback=interrupt)
    assert torch.equal(_sample(patched, positive, negative, empty_latent(arch, 16, 16)), first)
    assert deepcache.RUN_KEY not in patched.model_options["transformer_options"]
    assert not _tensors_in(deepcache.holder_of(patched))  # nothing of the run survives it


def _tensors_in(value, seen: set | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from `value` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    else:
        children = list(getattr(value, "__dict__", {}).values())
    return [tensor for child in children for tensor in _tensors_in(child, seen)]


# 3. beside other model patches --------------------------------------------------------------------

def test_controlnet_residuals_reach_the_shallow_path():
    """ControlNet adds residuals to every skip connection and the middle block each step. On a
    shallow call those of the shallow skip connections are added as usual; the deep ones act
    through the feature cached at the last full step (as the reference does)."""
    arch = "sd15"
    model = build_model(arch)
    control = build_controlnet(arch).copy().set_cond_hint(torch.rand(1, 3, 128, 128), 0.8, (0.0, 1.0))
    (context, extra), negative = conditioning(arch, 7, seed=1)[0], conditioning(arch, 7, seed=2)
    positive = [[context, {**extra, "control": control, "control_apply_to_uncond": True}]]
    latent = empty_latent(arch, 16, 16)
    plain = _sample(model, positive, negative, latent)
    assert not torch.equal(plain, _sample(model, [[context, extra]], negative, latent))  # the ControlNet acts
    assert torch.equal(_sample(_deepcache(model, 1), positive, negative, latent), plain)
    for depth in (0, 4):
        reference = ReferenceDeepCache(3, depth)
        expected = _sample(reference.model(model), positive, negative, latent)
        assert torch.equal(_sample(_deepcache(model, 3, depth), positive, negative, latent), expected)


def test_lora_weight_patches_act_on_full_and_shallow_steps():
    arch = "sd15"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    lora = model.clone()
    state = lora.model_state_dict()
    keys = ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.middle_block.0.in_layers.2.weight",
            "diffusion_model.output_blocks.8.0.out_layers.3.weight"]
    gen = torch.Generator().manual_seed(3)
    lora.add_patches({key: (torch.randn(state[key].shape, generator=gen) * 0.05,) for key in keys}, 1.0)
    with_lora = _sample(lora, positive, negative, latent)
    assert torch.equal(_sample(_deepcache(lora, 1), positive, negative, latent), with_lora)
    reference = ReferenceDeepCache(3, 0)
    expected = _sample(reference.model(lora), positive, negative, latent)
    cached = _sample(_deepcache(lora, 3), positive, negative, latent)
    assert torch.equal(cached, expected)
    assert not torch.equal(cached, _sample(_deepcache(model, 3), positive, negative, latent))


# 4. the node and the report -------------------------------------------------------------------

def test_report_names_the_blocks_skipped():
    arch = "sd15"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    patched = _deepcache(model, 3)
    with pytest.raises(ValueError, match="not been sampled yet"):
        inspector_nodes.AttentionReport.execute(patched, {})
    _sample(patched, positive, negative, empty_latent(arch, 16, 16))
    text = inspector_nodes.AttentionReport.execute(patched, {}).result[0]
    blocks = 9 + 1 + 9
    assert f"DeepCache (1:3 uniform, depth 0): {STEPS} U-Net calls over {STEPS} steps, 2 full and 4 shallow; " \
           f"skipped {4 * (blocks - 2)} of {STEPS * blocks} block runs" in text


def test_clear_errors_for_models_and_depths_it_cannot_serve():
    with pytest.raises(deepcache.UnsupportedModelError, match="U-Net models.*this model is a Flux"):
        _deepcache(build_model("flux"), 3)
    model = build_model("sd15")
    with pytest.raises(ValueError, match="cache_depth 9 is not a skip branch.*0 to 8"):
        _deepcache(model, 3, 9)
    with pytest.raises(ValueError, match="cache_interval must be at least 1"):
        _deepcache(model, 0)
    with pytest.raises(ValueError, match="start/end percent"):
        _deepcache(model, 3, 0, 0.8, 0.2)
    one_level = build_model("sd15", num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                            transformer_depth_output=[0, 0], transformer_depth_middle=-2)
    with pytest.raises(ValueError, match="cache_depth 1 leaves nothing to cache"):
        _deepcache(one_level, 3, 1)
    assert deepcache.holder_of(_deepcache(one_level, 3, 0)).layout.skipped_blocks() == ["input_blocks.1",
                                                                                         "output_blocks.0"]


def test_a_second_deepcache_node_replaces_the_first():
    arch = "sd15"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    latent = empty_latent(arch, 16, 16)
    twice = _deepcache(_deepcache(model, 2, 4), 3, 0)
    assert torch.equal(_sample(twice, positive, negative, latent), _sample(_deepcache(model, 3, 0), positive, negative,
                                                                           latent))
    assert twice.model_options["transformer_options"]["patches"]["output_block_patch"] == [deepcache.output_block_patch]


# 5. the schedule ------------------------------------------------------------------------------

def test_uniform_and_non_uniform_positions():
    assert deepcache_schedule.full_positions(10, 3, "uniform") == {0, 3, 6, 9}
    assert deepcache_schedule.full_positions(10, 1, "non-uniform") == set(range(10))
    for count, interval in [(20, 2), (20, 3), (20, 5), (50, 3), (7, 3), (3, 5)]:
        positions = sorted(deepcache_schedule.full_positions(count, interval, "non-uniform"))
        assert len(positions) == math.ceil(count / interval) and positions[0] == 0 and positions[-1] < count
    # The spacing, written out: centre c = 0.3 * count, u evenly spaced over [-c ** (1/p), (count - c) ** (1/p)),
    # positions floor(c + sign(u) |u| ** p); at p = 1.4 these 7 are distinct, densest next to c = 6.
    count, wanted, centre, power = 20, 7, 6.0, 1.4
    low, high = -(centre ** (1 / power)), (count - centre) ** (1 / power)
    u = [low + (high - low) * i / wanted for i in range(wanted)]
    expected = {math.floor(centre + math.copysign(abs(v) ** power, v)) for v in u}
    assert deepcache_schedule.full_positions(count, 3, "non-uniform") == expected == {0, 3, 5, 6, 9, 12, 15}
