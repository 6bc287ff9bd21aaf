"""DiTFastAttn's three techniques as nodes: MODEL in, patched clone out. Chain them to combine
(window + residual followed by CFG sharing is the paper's combined mode)."""

from __future__ import annotations

from comfy_api.latest import io

from ..patching import install, patch_of
from ..patching.ditfastattn import DiTFastAttn
from ..patching.schedule import (
    CFGSharing,
    NoiseRange,
    Schedule,
    Scope,
    StepSharing,
    Technique,
    WindowResidual,
    WindowSize,
    parse_layers,
)
from ..plans import Plan, PlanError

CATEGORY = "FastAttn/DiTFastAttn"
WINDOW_SHAPES = {
    "band (1D over the token sequence, as the paper)": "band",
    "square (2D / 3D neighbourhood)": "square",
    "circle (2D / 3D neighbourhood)": "circle",
}


def _scope_inputs() -> list:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise level where the technique starts, as a percent of the model's noise schedule "
                               "(0: pure noise), as ComfyUI's own nodes read it: a split sampler, denoise below 1 "
                               "or custom sigmas keep the same noise levels."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise level where the technique stops (1: the end of sampling), as a percent of the "
                               "model's noise schedule."),
        io.String.Input("layers", default="",
                        tooltip="Attention layers to act on, as the Attention Inspector numbers them, "
                                "e.g. '0-3, 7'. Empty: all layers. Cross-attention and text-only layers keep "
                                "their numbers but are never changed: the techniques act on self-attention over "
                                "image tokens."),
    ]


def _scope(start_percent: float, end_percent: float, layers: str) -> Scope:
    return Scope(NoiseRange(start_percent, end_percent), parse_layers(layers))


def _technique_schema(node_id: str, display_name: str, description: str, inputs: list) -> io.Schema:
    """Every technique node: MODEL, its own inputs, the step range and layers; MODEL out."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=CATEGORY,
        description=description,
        inputs=[
            io.Model.Input("model", tooltip="The diffusion transformer (from the model loader or another FastAttn node)."),
            *inputs,
            *_scope_inputs(),
        ],
        outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
    )


def with_technique(model, technique: Technique):
    """A clone of `model` with `technique` added after the DiTFastAttn techniques it already has.
    A plan (Apply Plan, Calibrate) already sets every step and layer: adding to it is refused."""
    existing = patch_of(model)
    schedule = existing.method.schedule if existing and isinstance(existing.method, DiTFastAttn) else Schedule()
    if isinstance(schedule, Plan):
        raise PlanError("FastAttn: this model carries a calibrated plan (from Apply Plan or Calibrate), which sets the "
                        "technique of every step and attention layer; a technique node cannot be added after it. "
                        "Use either the plan or technique nodes on one model: connect this node to the model "
                        "before Apply Plan / Calibrate and remove the plan, or leave this node out (Calibrate's "
                        "candidate switches choose which techniques a plan may use).")
    return install(model, DiTFastAttn(schedule.then(technique)))


class WindowResidualAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _technique_schema(
            "FastAttnWindowResidual",
            "Window Attention + Residual (DiTFastAttn)",
            "Every refresh_every-th step computes full attention and caches the residual full - window; the steps "
            "between compute only a local window and add the cached residual. Text tokens keep full attention "
            "both ways.",
            [
                io.Combo.Input("window_shape", options=list(WINDOW_SHAPES), default=next(iter(WINDOW_SHAPES)),
                               tooltip="band: each image token sees the tokens within the radius in sequence order. "
                                       "square / circle: the tokens within the radius on the image grid "
                                       "(and across frames for video)."),
                io.Float.Input("window_fraction", default=0.125, min=0.01, max=1.0, step=0.005,
                               tooltip="Radius per side as a fraction of the image tokens (band) or of the larger "
                                       "grid side (square / circle). 0.125 is the paper's N/8."),
                io.Int.Input("window_tokens", default=0, min=0, max=1 << 20,
                             tooltip="Radius per side in tokens (band) or grid cells (square / circle); "
                                     "0 uses window_fraction."),
                io.Int.Input("refresh_every", default=4, min=2, max=1000,
                             tooltip="Full attention (and a fresh residual) every this many steps within the noise "
                                     "range, counted from each sampler's first step in it; window + residual in "
                                     "between. 4 is the setting measured in BENCHMARKS.md."),
                io.Boolean.Input("residual", default=True,
                                 tooltip="Add the residual cached at the last full step to the window's output. "
                                         "Off: plain window attention (only to compare; it is less faithful)."),
            ],
        )

    @classmethod
    def execute(cls, model, window_shape: str, window_fraction: float, window_tokens: int, refresh_every: int,
                residual: bool, start_percent: float, end_percent: float, layers: str) -> io.NodeOutput:
        window = WindowSize(WINDOW_SHAPES[window_shape], window_fraction, window_tokens)
        technique = WindowResidual(window, refresh_every, _scope(start_percent, end_percent, layers), residual)
        return io.NodeOutput(with_technique(model, technique))


class StepSharingAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _technique_schema(
            "FastAttnStepSharing",
            "Step Attention Sharing (DiTFastAttn)",
            "Computes attention every compute_every-th step and reuses each layer's last output (per batch half) "
            "in between. The whole attention branch is skipped (QKV and output projections too) where the "
            "model's adapter maps it (every served model but Cosmos 1.0); elsewhere only the attention call.",
            [io.Int.Input("compute_every", default=2, min=2, max=1000,
                          tooltip="Attention is computed at every this-many-th step within the noise range, counted "
                                  "from each sampler's first step in it; reused between.")],
        )

    @classmethod
    def execute(cls, model, compute_every: int, start_percent: float, end_percent: float, layers: str) -> io.NodeOutput:
        technique = StepSharing(compute_every, _scope(start_percent, end_percent, layers))
        return io.NodeOutput(with_technique(model, technique))


class CFGSharingAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _technique_schema(
            "FastAttnCFGSharing",
            "CFG Attention Sharing (DiTFastAttn)",
            "Computes attention for the conditional half only and gives the unconditional half a copy (self-attention "
            "only: sharing cross-attention would turn CFG off; where the adapter maps the branch its projections "
            "run on the conditional half only too). Needs ComfyUI's CFG guider (KSampler, CFGGuider); "
            "with other guiders (DualCFG, PerpNeg) and at CFG 1 it does nothing, and the Attention Report says so.",
            [],
        )

    @classmethod
    def execute(cls, model, start_percent: float, end_percent: float, layers: str) -> io.NodeOutput:
        return io.NodeOutput(with_technique(model, CFGSharing(_scope(start_percent, end_percent, layers))))


DITFASTATTN_NODES: list[type[io.ComfyNode]] = [WindowResidualAttention, StepSharingAttention, CFGSharingAttention]
