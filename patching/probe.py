"""Profile a model's attention at one latent size without computing it.

One sampling step runs through ComfyUI's own path with the runtime installed, so the
profile sees exactly what the runtime would see. The diffusion model runs on fake tensors
(shapes only, no arithmetic) under a FLOP counter, and every attention call returns zeros
instead of being computed, so profiling FLUX at 2048^2 costs milliseconds, not a forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.patcher_extension
import comfy.sample
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .call import AttentionCall
from .report import RunReport
from .runtime import install, patch_of
from .site import CallSite
from .state import SamplingRun

PROBE_KEY = "fastattn.probe"


@dataclass(frozen=True)
class AttentionProfile:
    model_class: str
    latent_shape: tuple[int, ...]
    report: RunReport
    other_flops: int  # FLOPs of everything but attention in one forward
    fake: bool  # computed on fake tensors (False: a real forward was needed)

    @property
    def attention_flops(self) -> int:
        return self.report.full_flops

    @property
    def attention_share(self) -> float:
        total = self.attention_flops + self.other_flops
        return self.attention_flops / total if total else 0.0

    def to_text(self) -> str:
        layers = self.report.layers
        kinds = {kind: sum(1 for layer in layers if layer.kind == kind) for kind in dict.fromkeys(r.kind for r in layers)}
        placed = sorted((layer for layer in layers if layer.layout is not None), key=lambda r: r.kind != "joint")
        layout = placed[0].layout if placed else None
        lines = [
            f"Architecture: {self.report.architecture} ({self.model_class})",
            f"Latent: {' x '.join(map(str, self.latent_shape))}",
        ]
        if layout is not None:
            side = "before" if layout.text_first else "after"
            side = "no adapter: side not proven" if self.report.layout_derived else f"{side} the image"
            grid = " x ".join(map(str, layout.grid))
            lines.append(f"Image tokens: {layout.image_len} (grid {grid}); text tokens: {layout.text_len} ({side})")
        lines.append(f"Attention layers per forward: {len(layers)} (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
        lines.append(f"{'layer':>5}  {'kind':<7} {'heads':>5} {'head dim':>8} {'queries':>8} {'keys':>8}")
        lines += [
            f"{r.layer:>5}  {r.kind:<7} {r.heads:>5} {r.head_dim:>8} {r.q_len:>8} {r.k_len:>8}" for r in layers
        ]
        lines.append(
            f"FLOPs per forward: attention {_tera(self.attention_flops)} of {_tera(self.attention_flops + self.other_flops)}"
            f" in all = {100 * self.attention_share:.1f}% attention"
        )
        if not self.fake:
            lines.append("(this model could not be traced on fake tensors; one real forward was run)")
        return "\n".join(lines)


def _tera(flops: int) -> str:
    return f"{flops / 1e12:.3f} TFLOP" if flops >= 1e10 else f"{flops / 1e9:.3f} GFLOP"


def _skip_attention(call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
    """Zeros of the right shape instead of attention; the runtime counts the FLOPs."""
    batch, heads, q_len, _ = call.heads_first()[0].shape
    value_dim = call.heads_first()[2].shape[-1]
    out = torch.zeros(batch, heads, q_len, value_dim, dtype=call.q.dtype, device=call.q.device)
    return call.format_output(out), 0, "full"


class _ForwardCounter:
    """Inner APPLY_MODEL wrapper: run the diffusion model once under a FLOP counter, on fake
    tensors when it can be traced that way, and hand the sampler back real zeros."""

    def __init__(self) -> None:
        self.other_flops = 0
        self.fake = True

    def __call__(self, executor, x, *args, **kwargs):
        counter = FlopCounterMode(display=False)
        if self.fake:
            try:
                with FakeTensorMode(allow_non_fake_inputs=True), counter:
                    executor(x, *args, **kwargs)
            except Exception as error:  # a data-dependent model: fall back to one real forward
                logging.info("FastAttn inspector: fake-tensor trace failed (%s); running one real forward", error)
                self.fake = False
                counter = FlopCounterMode(display=False)
        if not self.fake:
            with counter:
                executor(x, *args, **kwargs)
        self.other_flops = counter.get_total_flops()
        return torch.zeros_like(x)


def profile_attention(model, positive: list, latent: dict) -> AttentionProfile:
    """Profile `model` (a ModelPatcher) at the size of `latent` with the text of `positive`."""
    probe = install(model, _skip_attention)
    counter = _ForwardCounter()
    probe.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PROBE_KEY, counter)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = torch.zeros_like(samples)
    comfy.sample.sample(probe, noise, 1, 1.0, "euler", "simple", positive, positive, samples, disable_pbar=True, seed=0)
    report = patch_of(probe).last_report
    diffusion_model = model.model.diffusion_model
    model_class = f"{type(diffusion_model).__module__}.{type(diffusion_model).__name__}"
    return AttentionProfile(model_class, tuple(samples.shape), report, counter.other_flops, counter.fake)
