"""What bench_e2e_gpu.py samples: the models at their released configurations (and tiny ones for
--smoke and the correctness check), their conditioning, and the rows (the unpatched model, each
technique at the example workflows' settings, CLEAR r16, a uniform plan, core LazyCache).

Imported after the host is set up (it imports ComfyUI). `pack` is the pack's package name."""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field, replace

import comfy.model_patcher
import comfy.sample
import comfy.supported_models
import torch


@dataclass(frozen=True)
class Model:
    """A diffusion model as ComfyUI builds it from a checkpoint: its config class and unet_config
    (what comfy/model_detection.py reads off the released weights), and what its text encoders give."""

    arch: str  # the pack's / the test harness's architecture name
    config_class: str  # in comfy.supported_models
    unet_config: dict
    text_len: int  # tokens ComfyUI's text encoder gives for a short prompt
    context_dim: int
    pooled_dim: int | None = None
    guidance: float | None = None  # distilled guidance (FLUX)


@dataclass(frozen=True)
class Case:
    """One model at one size, sampled as its example workflow samples it (steps cut to fit)."""

    name: str
    model: Model
    latent: tuple[int, ...]  # [channels, (frames,) height, width]
    cfg: float
    sampler: str
    scheduler: str
    steps: int  # timed here
    workflow_steps: int  # the example workflow's
    shift: float | None = None  # ModelSamplingSD3's shift (Wan's workflow)
    budget_share: float = 0.25  # share of the time budget
    rows: tuple[str, ...] = ()  # in priority order: the budget drops the last first
    skipped: dict = field(default_factory=dict)  # row -> why it is not run for this case


FLUX_DEV = Model(
    "flux", "Flux",
    dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, vec_in_dim=768,
         context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
         axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True),
    text_len=256, context_dim=4096, pooled_dim=768, guidance=3.5,
)
SD35_LARGE = Model(
    "sd3", "SD3",
    dict(in_channels=16, out_channels=16, patch_size=2, depth=38, input_size=None, adm_in_channels=2048,
         context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
         num_patches=36864, pos_embed_max_size=192, qk_norm="rms", pos_embed_scaling_factor=None,
         x_block_self_attn_layers=[]),
    text_len=154, context_dim=4096, pooled_dim=2048,
)
WAN21 = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def wan_model(size: str) -> Model:
    return Model(
        "wan", "WAN21_T2V",
        dict(image_model="wan2.1", model_type="t2v", in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
             patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
             **WAN21[size]),
        text_len=512, context_dim=4096,
    )


ALL_ROWS = ("unpatched", "window + residual", "step sharing", "CFG sharing", "combined", "CLEAR r16",
            "uniform plan", "LazyCache 0.2")
GOAL_FIRST = {  # the row of the speed goal at each size comes right after the baseline
    "FLUX.1-dev 1024^2": "combined", "FLUX.1-dev 2048^2": "CLEAR r16", "Wan 2.1 1.3B 480p x 81": "window + residual",
}
CFG_ONE = {"CFG sharing": "CFG 1: one forward per step, no unconditional half to share"}


def _order(name: str, cfg: float) -> tuple[tuple[str, ...], dict]:
    goal = GOAL_FIRST.get(name)
    rows = ("unpatched", *([goal] if goal else []), *(r for r in ALL_ROWS[1:] if r != goal))
    skipped = dict(CFG_ONE) if cfg == 1.0 else {}
    return tuple(r for r in rows if r not in skipped), skipped


def _case(name: str, model: Model, latent: tuple, cfg: float, sampler: str, scheduler: str, steps: int,
          workflow_steps: int, share: float, shift: float | None = None) -> Case:
    rows, skipped = _order(name, cfg)
    return Case(name, model, latent, cfg, sampler, scheduler, steps, workflow_steps, shift, share, rows, skipped)


# The example workflows' samplers (demo/workflows.py): FLUX euler / simple, CFG 1 (guidance 3.5);
# SD3.5 dpmpp_2m / sgm_uniform, CFG 4.5; Wan uni_pc / simple, CFG 6, shift 8. Steps cut to fit.
def real_cases(wan_size: str = "1.3B") -> list[Case]:
    wan = wan_model(wan_size)
    return [
        _case("FLUX.1-dev 1024^2", FLUX_DEV, (16, 128, 128), 1.0, "euler", "simple", 12, 20, 0.2),
        _case("FLUX.1-dev 2048^2", FLUX_DEV, (16, 256, 256), 1.0, "euler", "simple", 6, 20, 0.3),
        _case(f"Wan 2.1 {wan_size} 480p x 81", wan, (16, 21, 60, 104), 6.0, "uni_pc", "simple", 6, 30, 0.3, 8.0),
        _case("SD3.5 Large 1024^2", SD35_LARGE, (16, 128, 128), 4.5, "dpmpp_2m", "sgm_uniform", 10, 28, 0.2),
    ]


def tiny_model(arch: str, specs: dict) -> Model:
    """The test harness's small config of `arch` (hidden 128, 2 heads)."""
    spec = specs[arch]
    return Model(arch, spec.config_class.__name__, spec.unet_config, 8, spec.context_dim, spec.pooled_dim,
                 spec.guidance)


def smoke_cases(specs: dict) -> list[Case]:
    """The real cases' samplers and rows on tiny models and latents (seconds on a CPU)."""
    sizes = {"flux": (16, 16, 16), "sd3": (16, 16, 16), "wan": (16, 2, 8, 8)}
    return [replace(case, model=tiny_model(case.model.arch, specs), latent=sizes[case.model.arch], steps=4)
            for case in real_cases()]


def build(model: Model, device: torch.device, dtype: torch.dtype, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """The model as ComfyUI builds a checkpoint's, on `device` in `dtype`, with seeded random weights
    (std 1/sqrt(fan_in) for matrices: activations keep unit scale; norms 1 / 0; the rest small noise)."""
    config = getattr(comfy.supported_models, model.config_class)(dict(model.unet_config))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    norms = {id(m) for m in base.diffusion_model.modules() if "Norm" in type(m).__name__}
    with torch.no_grad():
        for owner in base.diffusion_model.modules():
            for name, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if id(owner) in norms:
                    tensor.fill_(1.0 if name in ("weight", "scale") else 0.0)
                elif name == "weight" and tensor.ndim >= 2:
                    noise = torch.randn(tensor.shape, generator=gen, device=device, dtype=torch.float32)
                    tensor.copy_(noise * tensor[0].numel() ** -0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen, device=device) * 0.02)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def moved(model: comfy.model_patcher.ModelPatcher, device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A copy of `model` with its weights on `device` (the same weights: a CUDA generator would draw
    other numbers than the CPU one from the same seed)."""
    base = copy.deepcopy(model.model).to(device)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def conditioning(model: Model, seed: int) -> list:
    """A CONDITIONING as the text encode node gives it: random text features (and pooled / guidance)."""
    gen = torch.Generator().manual_seed(seed)
    extra: dict = {}
    context = torch.randn((1, model.text_len, model.context_dim), generator=gen)
    if model.pooled_dim is not None:
        extra["pooled_output"] = torch.randn((1, model.pooled_dim), generator=gen)
    if model.guidance is not None:
        extra["guidance"] = model.guidance
    return [[context, extra]]


def sample(model, case: Case, positive: list, negative: list, steps: int, seed: int = 7) -> torch.Tensor:
    """What KSampler does (nodes.common_ksampler): fixed noise from `seed`, ComfyUI's sampler."""
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, *case.latent))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, case.cfg, case.sampler, case.scheduler, positive, negative,
                               latent, disable_pbar=True, seed=seed)


class Rows:
    """Each row's model, made from the unpatched one by the nodes an example workflow would use."""

    def __init__(self, pack: str) -> None:
        self.workflows = importlib.import_module(f"{pack}.demo.workflows")
        schema = importlib.import_module(f"{pack}.plans.schema")
        nodes = [importlib.import_module(f"{pack}.nodes.{name}") for name in ("ditfastattn", "clear", "plans")]
        classes = [*nodes[0].DITFASTATTN_NODES, *nodes[1].CLEAR_NODES, *nodes[2].PLAN_NODES]
        self.nodes = {cls.define_schema().node_id: cls for cls in classes}
        self.schema, self.shapes = schema, nodes[0].WINDOW_SHAPES
        self.adapter_for = importlib.import_module(f"{pack}.patching").adapter_for
        self.window_size = importlib.import_module(f"{pack}.patching.schedule").WindowSize
        self.lazy_cache = importlib.import_module("comfy_extras.nodes_easycache").LazyCacheNode

    def chain(self, row: str) -> list[tuple[str, dict]]:
        """The example workflow's FastAttn nodes for a technique row (demo/workflows.py)."""
        technique = {"window + residual": "window_residual", "step sharing": "step_sharing",
                     "CFG sharing": "cfg_sharing", "combined": "combined", "CLEAR r16": "clear_zero_shot"}[row]
        return self.workflows.TECHNIQUES[technique][1]

    def make(self, row: str, model, case: Case, layers: list) -> object:
        """The row's model; `layers` are the probe's attention layers (for the uniform plan)."""
        if row == "unpatched":
            return model
        if row == "LazyCache 0.2":  # core ComfyUI's step cache at its defaults (PREDICT_NOISE hook)
            return self.lazy_cache.execute(model, 0.2, 0.15, 0.95, False).result[0]
        if row == "uniform plan":
            plan = self.uniform_plan(model, case, layers)
            return self.nodes["FastAttnApplyPlan"].execute(model, "", plan.to_json()).result[0]
        for class_type, inputs in self.chain(row):
            model = self.nodes[class_type].execute(model, **inputs).result[0]
        return model

    def uniform_plan(self, model, case: Case, layers: list):
        """A plan with the combined mode's technique in every cell of every image / joint layer: full
        attention every 4th step, window + residual (the workflows' N/8 band) between, CFG sharing in
        the second half where the model samples with CFG. Exercises plan application at scale."""
        schema = self.schema
        refresh = self.workflows.WINDOW_BAND["refresh_every"]
        methods = []
        for step in range(case.steps):
            cfg = "+asc" if case.cfg != 1.0 and step >= case.steps / 2 else ""
            technique = ("full" if step % refresh == 0 else "wars") + cfg
            methods.append([technique if r.kind in schema.WINDOWED_KINDS else "full" for r in layers])
        fingerprint = schema.Fingerprint(self.adapter_for(model.model.diffusion_model).name,
                                         tuple(schema.LayerInfo(r.kind, r.heads, r.head_dim) for r in layers))
        window = self.window_size("band", self.workflows.WINDOW_BAND["window_fraction"])
        return schema.Plan(fingerprint, schema.CalibrationInfo(case.steps), window, methods)

    def reference_chain(self, row: str) -> list[dict] | None:
        """The row as tests/harness/reference_schedule.py's chain, for the rows it specifies (DiTFastAttn's
        techniques; None for the others)."""
        if row == "unpatched":
            return []
        if row not in ("window + residual", "step sharing", "CFG sharing", "combined"):
            return None
        chain = []
        for class_type, inputs in self.chain(row):
            scope = {"start": inputs["start_percent"], "end": inputs["end_percent"], "layers": inputs["layers"]}
            if class_type == "FastAttnWindowResidual":
                chain.append({"technique": "window", "shape": self.shapes[inputs["window_shape"]],
                              "fraction": inputs["window_fraction"], "tokens": inputs["window_tokens"],
                              "refresh_every": inputs["refresh_every"], "residual": inputs["residual"], **scope})
            elif class_type == "FastAttnStepSharing":
                chain.append({"technique": "step", "compute_every": inputs["compute_every"], **scope})
            else:
                chain.append({"technique": "cfg", **scope})
        return chain

