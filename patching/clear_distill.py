"""CLEAR's distillation: fine-tune a model's image-stream attention projections (and pooling
weights) so that with local attention it matches itself with full attention.

The teacher is the same model with full attention and its original weights; the student adds
trainable deltas to the projections through ModelPatcher weight wrappers (as ComfyUI's LoRA
trainer does) and runs local attention through a differentiable dense masked softmax (the
kernels' reference; the fast kernels have no backward). Training runs inside ComfyUI's own
sampling path as a custom Sampler, so conditioning, model loading and the runtime's wrappers
are the host's. Losses as in CLEAR's paper (docs/nodes.md, CLEAR Distillation), on the model's prediction
(x_t - denoised) / sigma (velocity for flow models): flow matching against the teacher's
samples + 0.5 x MSE(student, teacher) + 0.5 x MSE of every local layer's attention output,
with the sampling's prompts and CFG scale (the guided prediction is what sampling uses).

What trains is read from the architecture's adapter (the projections of its attention branches):
the image-stream q/k/v and output projections of SD3-class (MMDiT) and FLUX models, and the q/k/v
rows of FLUX's fused single-block layer, as CLEAR trains FLUX. FLUX's blocks add to their input in
place (`img += ...`), which autograd rejects once that input was saved for the backward pass; the
student's blocks run through block replacements that make those adds out of place (ResidualStream),
without a copy of the model's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy_extras.nodes_train import process_cond_list
from torch import nn
from tqdm import trange

from ..kernels import reference_attention
from ..kernels.pooling import default_pool_weight
from .adapters import Projection, adapter_for
from .call import AttentionCall
from .clear_weights import (
    ARCHITECTURE_KEY,
    FORMAT_KEY,
    LAYER_POOL_WEIGHT,
    NATIVE_FORMAT,
    POOL_KEY,
    RADIUS_KEY,
)
from .ditfastattn import SELF_ATTENTION_KINDS
from .runtime import install
from .schedule import WindowSize
from .site import CallSite
from .state import SamplingRun

DISTILLABLE = ("SD3 (MMDiT)", "Flux")  # adapters whose branch maps say what CLEAR trains (tested)
DISTILLED_MODELS = "SD3-class (MMDiT) and FLUX models"  # DISTILLABLE as the node's texts name it
FLUX_BLOCKS = ("double_block", "single_block")  # block kinds whose residual adds go out of place
PREFIX = "diffusion_model."


@dataclass(frozen=True)
class DistillSettings:
    radius: int
    pool: int = 0
    iterations: int = 100
    learning_rate: float = 1e-4
    seed: int = 0
    flow_matching: float = 1.0  # weight of the flow-matching term (CLEAR: 1; the other two are 0.5 each)


class Delta(nn.Module):
    """A trainable change to a weight or bias (a ModelPatcher weight wrapper), to its leading `rows`
    only in a fused layer (FLUX single blocks: q, k, v before the MLP's rows); off for the teacher."""

    def __init__(self, shape: torch.Size, rows: int | None = None, start: torch.Tensor | None = None) -> None:
        super().__init__()
        shape = shape if rows is None else torch.Size((rows, *shape[1:]))
        self.delta = nn.Parameter(torch.zeros(shape) if start is None else start.float().clone())
        self.enabled = True

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        rows = self.delta.shape[0]
        changed = weight[:rows] + self.delta.to(weight.dtype)
        return changed if rows == weight.shape[0] else torch.cat((changed, weight[rows:]))

    def trained(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows this delta trains, changed: what the CLEAR file keeps for this key."""
        return (weight[:self.delta.shape[0]].float() + self.delta.detach()).to(weight.dtype).contiguous()


class ResidualStream(torch.Tensor):
    """A block's residual stream whose `x += y` makes a new tensor instead of writing into x (Python
    rebinds x to what __iadd__ returns); every other operation on it returns plain tensors."""

    def __iadd__(self, other):
        return (self.as_subclass(torch.Tensor) + other).as_subclass(ResidualStream)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_plain(args), **_plain(kwargs or {}))


def _plain(value):
    """`value` with every ResidualStream in it (at any depth of tuples, lists, dicts) a plain tensor."""
    if isinstance(value, ResidualStream):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def out_of_place_residuals(args: dict, extra: dict) -> dict:
    """A FLUX block replacement: the original block, with its residual adds out of place."""
    streams = {name: args[name].as_subclass(ResidualStream) for name in ("img", "txt") if name in args}
    out = extra["original_block"]({**args, **streams})
    return {name: tensor.as_subclass(torch.Tensor) for name, tensor in out.items()}


class DistillAttention:
    """The attention method while training: full attention for the teacher; local attention
    by the dense reference for the student. Keeps each windowed layer's output of the last pass."""

    def __init__(self, window: WindowSize, pool_weights: dict[int, nn.Parameter]) -> None:
        self.window = window
        self.pool_weights = pool_weights
        self.teacher = False
        self.outputs: dict[int, torch.Tensor] = {}

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
        layout = site.layout if site.kind in SELF_ATTENTION_KINDS and call.mask is None else None
        if layout is None:
            return call.run_default(), call.flops(), "full"
        window = self.window.window_for(layout)
        if self.teacher:
            out, technique = call.run_default(), "full"
        else:
            window.check(layout)  # an error here, not a silent full layer: the user picked this size
            if window.pool and site.layer not in self.pool_weights:
                self.pool_weights[site.layer] = nn.Parameter(default_pool_weight(window.pool, device=call.q.device))
            q, k, v = call.heads_first()
            out = call.format_output(reference_attention(q, k, v, layout, window,
                                                         pool_weight=self.pool_weights.get(site.layer)))
            technique = "window"
        self.outputs[site.layer] = out
        return out, call.flops(), technique


@dataclass
class Trainable:
    """What the student trains: deltas by state-dict key, pooling weights by attention layer."""

    deltas: dict[str, Delta] = field(default_factory=dict)
    pool_weights: dict[int, nn.Parameter] = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        return [d.delta for d in self.deltas.values()] + list(self.pool_weights.values())

    def teacher(self, on: bool) -> None:
        for delta in self.deltas.values():
            delta.enabled = not on


def trained_projections(model) -> list[Projection]:
    """The projections CLEAR trains in `model`: image-stream (or joint) q/k/v and output layers of its
    attention branches, a fused output layer (FLUX single blocks' attention and MLP) left out."""
    adapter = adapter_for(model.model.diffusion_model)
    projections = adapter.projections(model.model.diffusion_model) if adapter.projections else []
    projections = [p for p in projections if p.tokens != "text" and (p.role == "qkv" or p.branch_features is None)]
    if adapter.name not in DISTILLABLE or not projections:
        raise ValueError(f"CLEAR distillation trains {DISTILLED_MODELS}; "
                         f"{type(model.model.diffusion_model).__name__} is not supported yet")
    return projections


def trainable_for(model, start: dict[str, torch.Tensor] | None = None) -> Trainable:
    """Deltas for every projection CLEAR trains in `model`; `start` (trained tensors by state-dict
    key, from an earlier file: whole, or the leading rows of a fused layer) resumes from them."""
    trainable = Trainable()
    for projection in trained_projections(model):
        module = model.get_model_object(f"diffusion_model.{projection.path}")
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind)
            if tensor is None:
                continue
            key = f"{PREFIX}{projection.path}.{kind}"
            begin = None
            if start is not None and key in start:
                if start[key].shape[1:] != tensor.shape[1:] or start[key].shape[0] != (projection.branch_features
                                                                                        or tensor.shape[0]):
                    raise ValueError(f"CLEAR Distillation: {key} in the file to resume has shape "
                                     f"{tuple(start[key].shape)}, which this model's layer does not fit")
                begin = start[key].float() - tensor[:start[key].shape[0]].float()
            trainable.deltas[key] = Delta(tensor.shape, projection.branch_features, begin)
    return trainable


def _with_out_of_place_residuals(student) -> None:
    """FLUX: every block of the student through the block replacement that adds out of place."""
    diffusion_model = student.model.diffusion_model
    if adapter_for(diffusion_model).name != "Flux":
        return
    for kind, blocks in zip(FLUX_BLOCKS, (diffusion_model.double_blocks, diffusion_model.single_blocks),
                            strict=True):
        for index in range(len(blocks)):
            student.set_model_patch_replace(out_of_place_residuals, "dit", kind, index)


class DistillSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would sample (as ComfyUI's TrainSampler does):
    the guider hands it the model wrapper with conditioning and wrappers in place."""

    def __init__(self, trainable: Trainable, attention: DistillAttention, settings: DistillSettings,
                 on_loss: Callable[[int, float], None]) -> None:
        self.trainable = trainable
        self.attention = attention
        self.settings = settings
        self.on_loss = on_loss
        self.optimizer = torch.optim.Adam(trainable.parameters(), lr=settings.learning_rate)
        self.steps_done = 0

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        process_cond_list(model_wrap.conds)  # inference tensors -> plain ones
        sampling = model_wrap.inner_model.model_sampling
        generator = torch.Generator().manual_seed(self.settings.seed)
        progress = comfy.utils.ProgressBar(self.settings.iterations)
        for step in (bar := trange(self.settings.iterations, desc="CLEAR distillation",
                                   disable=not comfy.utils.PROGRESS_BAR_ENABLED)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x0 = latent_image[torch.randint(len(latent_image), (1,), generator=generator)]
            sigma = torch.tensor([sampling.percent_to_sigma(0.02 + 0.96 * torch.rand((), generator=generator).item())])
            x_t = sampling.noise_scaling(sigma, torch.randn(x0.shape, generator=generator), x0, False)
            loss = self._loss(model_wrap, x_t, sigma, x0, extra_args)
            self.optimizer.zero_grad()
            loss.backward()
            self._train_new_pool_weights()
            self.optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            progress.update_absolute(step + 1)
            self.steps_done = step + 1
            self.on_loss(step, loss.item())
        return latent_image

    def _train_new_pool_weights(self) -> None:
        """Pooling weights are made on a layer's first windowed call: hand them to the optimizer."""
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        fresh = [p for p in self.trainable.pool_weights.values() if id(p) not in known]
        if fresh:
            self.optimizer.add_param_group({"params": fresh})

    def _loss(self, model_wrap, x_t: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, extra_args) -> torch.Tensor:
        scale = sigma.view(-1, *[1] * (x_t.ndim - 1))
        self.trainable.teacher(True)
        self.attention.teacher = True
        try:
            with torch.no_grad():
                teacher = (x_t - model_wrap(x_t, sigma, **extra_args)) / scale
                teacher_attention = dict(self.attention.outputs)
        finally:
            self.trainable.teacher(False)
            self.attention.teacher = False
        student = (x_t - model_wrap(x_t, sigma, **extra_args)) / scale
        flow_matching = nn.functional.mse_loss(student, (x_t - x0) / scale)
        distill = nn.functional.mse_loss(student, teacher)
        layers = [layer for layer in self.attention.outputs if layer in teacher_attention]
        attention = sum(nn.functional.mse_loss(self.attention.outputs[layer], teacher_attention[layer])
                        for layer in layers) / max(len(layers), 1)
        return self.settings.flow_matching * flow_matching + 0.5 * distill + 0.5 * attention


def distill(model, positive, negative, cfg: float, teacher_latents: torch.Tensor, settings: DistillSettings,
            save: Callable[[dict[str, torch.Tensor], dict[str, str]], None],
            start: dict[str, torch.Tensor] | None = None, on_loss: Callable[[int, float], None] = lambda s, x: None,
            ) -> None:
    """Train on `teacher_latents` (the teacher's samples for the prompts, as a sampler returns
    them) with the prompts and CFG scale of sampling (the student must match the guided
    prediction, which CFG amplifies the errors of), resuming from `start` (an earlier file's tensors) if given, then `save` the file's
    tensors and metadata: every trained projection whole (by state-dict key) and the pooling
    weights, for the CLEAR loader. Stops between steps when ComfyUI is interrupted, and saves
    what was trained so far (its metadata says how many steps)."""
    with torch.inference_mode(False), _frozen(model.model):  # ComfyUI runs nodes in inference mode: parameters
        trainable = trainable_for(model, start)  # must be made outside it
        trainable.pool_weights.update({int(k.removeprefix(LAYER_POOL_WEIGHT)): nn.Parameter(v.float().clone())
                                       for k, v in (start or {}).items() if k.startswith(LAYER_POOL_WEIGHT)})
        attention = DistillAttention(WindowSize("circle", tokens=settings.radius, pool=settings.pool),
                                     trainable.pool_weights)
        student = install(model, attention)
        _with_out_of_place_residuals(student)
        for key, delta in trainable.deltas.items():
            student.add_weight_wrapper(key, delta)
        sampler = DistillSampler(trainable, attention, settings, on_loss)
        guider = comfy.samplers.CFGGuider(student)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        sigmas = torch.tensor([float(model.model.model_sampling.sigma_max), 0.0])
        latents = teacher_latents.clone()
        try:
            guider.sample(torch.zeros_like(latents), latents, sampler, sigmas, seed=settings.seed)
        finally:
            if sampler.steps_done:
                save(*_file_contents(model, trainable, settings, sampler.steps_done))


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """The model's own tensors as autograd can use them while the deltas train: plain tensors
    (ComfyUI loads models under inference mode, and autograd cannot keep inference tensors for a
    backward; they become plain tensors of the same values, once, which inference does not notice)
    asking for no gradient (as ComfyUI's LoRA trainer freezes them), their flags restored after."""
    for owner in module.modules():
        for name, tensor in (*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)):
            if tensor.is_inference():
                plain = tensor.clone()
                setattr(owner, name, nn.Parameter(plain, tensor.requires_grad) if name in owner._parameters else plain)
    asking = [parameter for parameter in module.parameters() if parameter.requires_grad]
    for parameter in asking:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in asking:
            parameter.requires_grad_(True)


def _file_contents(model, trainable: Trainable, settings: DistillSettings,
                   steps_done: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = model.model_state_dict()
    tensors = {}
    with torch.no_grad():
        for key, delta in trainable.deltas.items():
            tensors[key] = delta.trained(state[key])
        for layer, weight in trainable.pool_weights.items():
            tensors[f"{LAYER_POOL_WEIGHT}{layer}"] = weight.detach().clone()
    metadata = {FORMAT_KEY: NATIVE_FORMAT, RADIUS_KEY: str(settings.radius), POOL_KEY: str(settings.pool),
                ARCHITECTURE_KEY: type(model.model.diffusion_model).__name__, "clear_steps": str(steps_done)}
    return tensors, metadata
