"""Calibrate (find a plan by sampling once), Prompt Batch (calibrate on several prompts) and Apply Plan
(carry a saved or pasted plan out)."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ..patching import adapter_for, install, patch_of
from ..patching.ditfastattn import DiTFastAttn
from ..patching.schedule import WindowSize
from ..plans import (
    COST_MEASURES,
    MODES,
    Plan,
    PlanError,
    PlannedAttention,
    Settings,
    calibrate,
    list_plans,
    load_plan,
    save_plan,
)
from ..plans.costs import cost_table
from ..plans.heatmap import image_tensor, render_heatmap
from ..plans.prompts import batch_prompts
from ..plans.storage import NO_PLAN, plan_path
from .ditfastattn import WINDOW_SHAPES

CATEGORY = "FastAttn/DiTFastAttn"
PlanType = io.Custom("FASTATTN_PLAN")
MORE_PROMPTS = 6  # Prompt Batch: optional prompts after the first two


def refuse_other_techniques(model, node: str) -> None:
    """A plan sets the technique of every step and layer itself: a model that already carries FastAttn
    techniques or a plan would have them silently replaced, so it is refused, saying what to do."""
    existing = patch_of(model)
    if existing is None or not isinstance(existing.method, DiTFastAttn):
        return
    schedule = existing.method.schedule
    if isinstance(schedule, Plan):
        raise PlanError(f"FastAttn {node}: this model already carries a plan (from Apply Plan or Calibrate); a "
                        "second plan would replace it. Connect this node to the model without the first plan.")
    if schedule.techniques:
        names = ", ".join(sorted({type(technique).__name__ for technique in schedule.techniques}))
        raise PlanError(f"FastAttn {node}: this model already has FastAttn technique nodes ({names}); a plan sets "
                        "the technique of every step and attention layer itself, so they would be dropped. Connect "
                        "this node to the model without them (straight from the loader or LoRA), and choose the "
                        "techniques a plan may use with Calibrate's candidate switches.")


class Calibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnCalibrate",
            display_name="Calibrate Attention Plan (DiTFastAttn)",
            category=CATEGORY,
            description="Samples once while choosing, for every step and attention layer, the cheapest DiTFastAttn "
                        "technique whose error stays within delta. Outputs the patched model, the plan (to save, "
                        "apply and share), this run's latent, a picture of the plan and the table of what each "
                        "candidate costs each layer (also shown on the node).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion transformer to calibrate (from the model loader)."),
                io.Conditioning.Input("positive", tooltip="The prompt to calibrate on, as for the sampler; or several, "
                                      "one per latent row, from Prompt Batch for Calibration."),
                io.Conditioning.Input("negative", tooltip="Negative prompt, as for the sampler."),
                io.Latent.Input("latent_image", tooltip="Latent of the size you will sample; a batch of several "
                                                        "(the paper used 6-8) makes the plan more general."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the calibration run. Its control starts at 'fixed' (the "
                                     "pack's frontend extension sets it), so queueing the workflow again does "
                                     "not recalibrate."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps; another step count, a split sampler or denoise below 1 uses "
                                     "the plan step calibrated at the nearest noise level."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as for the sampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Sampler of the calibration run."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler of the calibration run."),
                io.Float.Input("delta", default=0.1, min=0.0, max=10.0, step=0.005,
                               tooltip="Error threshold. Greedy: layer i of L may add up to (i+1)/L x delta of "
                                       "model-output error (the paper swept 0.025-0.15). Fast: each layer's "
                                       "relative attention error and each step's output error stay within delta. "
                                       "Budget: the root mean square of the relative attention errors over all "
                                       "steps and layers stays within delta. 0 keeps full attention everywhere."),
                io.Combo.Input("search_mode", options=list(MODES), default="fast",
                               tooltip="greedy: the paper's search, one model forward per candidate per layer per "
                                       "step (slow, faithful). fast: one scoring forward and one check per step, "
                                       "each step's cheapest choices. budget: one run measures every candidate "
                                       "(window sizes window_fraction x 0.25 / 0.5 / 1 / 2, residuals and shared outputs "
                                       "up to 4 steps old), then the error budget is spread over all steps and "
                                       "layers at the least cost; a second run samples with the plan."),
                io.Boolean.Input("step_sharing", default=True,
                                 tooltip="Candidate: reuse the layer's attention output of the previous step."),
                io.Boolean.Input("window_residual", default=True,
                                 tooltip="Candidate: window attention plus the residual cached at the last full step."),
                io.Boolean.Input("cfg_sharing", default=True,
                                 tooltip="Candidate: compute the conditional half only and copy it to the "
                                         "unconditional half (alone and with window + residual)."),
                io.Combo.Input("window_shape", options=list(WINDOW_SHAPES), default=next(iter(WINDOW_SHAPES)),
                               tooltip="Window of the window + residual technique (as in its own node)."),
                io.Float.Input("window_fraction", default=0.125, min=0.01, max=1.0, step=0.005,
                               tooltip="Window radius as a fraction of the image tokens (band) or of the larger grid "
                                       "side; a fraction, so the plan carries to other resolutions. Budget mode "
                                       "also tries a quarter, half and twice this."),
                io.String.Input("plan_name", default="",
                                tooltip="Save the plan under this name in your user folder (fastattn_plans), listed "
                                        "by Apply Plan. Empty: do not save."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a saved plan of the same name. Off: an existing name is an error."),
                io.Boolean.Input("per_head", default=False,
                                 tooltip="Fast mode only: where windowing a whole layer errs more than delta, window "
                                         "just the heads whose own relative error is within delta; the others "
                                         "compute full attention. Greedy mode refuses it (one model forward per "
                                         "head per layer per step would cost hundreds of baseline runs)."),
                io.Combo.Input("cost", options=list(COST_MEASURES), default=COST_MEASURES[0],
                               tooltip="Budget mode: what a candidate costs. time: its attention call timed on this "
                                       "device (a few runs per shape, remembered on this machine). flops: attention "
                                       "FLOPs (reproducible, blind to kernel overheads). Other modes use FLOPs."),
                io.Boolean.Input("step_reuse", default=False,
                                 tooltip="Budget mode only: a candidate for whole steps. A skipped step runs no "
                                         "model at all and takes its prediction from the last computed step (reuse) "
                                         "or extrapolates it from the last two (forecast), where that errs less "
                                         "than the step's attention choices would save. Costs one more forward per "
                                         "step while calibrating."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="As the sampler's denoise: below 1 the calibration run starts from "
                                       "latent_image (image to image) at that share of the schedule; the plan keeps "
                                       "those noise levels, so the same run later applies it step for step."),
                io.Boolean.Input("block_cache", default=False,
                                 tooltip="Budget mode only: a candidate for whole transformer blocks (SD3, Flux, "
                                         "Chroma, HunyuanVideo, Wan 2.1, Qwen-Image, Lumina 2, PixArt, AuraFlow). A "
                                         "skipped block runs nothing (attention, projections, MLP) and adds "
                                         "the change it made when it last ran, where that errs less than its "
                                         "layer's other choices would save."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone carrying out the plan; the input is unchanged."),
                PlanType.Output(display_name="plan", tooltip="The plan, for Apply Plan."),
                io.String.Output(display_name="plan_json", tooltip="The plan as JSON text (paste it into Apply Plan)."),
                io.Latent.Output(display_name="latent", tooltip="The calibration run's final latent (as sampled with "
                                                                "the plan)."),
                io.Image.Output(display_name="heatmap", tooltip="Technique per layer (rows) x step (columns), with "
                                                                "a legend, the attention FLOPs kept and (budget mode) "
                                                                "the check: the calibration run's final latent "
                                                                "against full attention's, in dB of signal to error."),
                io.String.Output(display_name="cost_table", tooltip="Each candidate's price per attention call on "
                                 "each layer shape, in measured ms (cost time, budget mode) or GFLOPs, and as a "
                                 "share of full attention: what the search weighed (also shown on the node)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, delta: float, search_mode: str, step_sharing: bool, window_residual: bool,
                cfg_sharing: bool, window_shape: str, window_fraction: float, plan_name: str,
                overwrite: bool, per_head: bool = False, cost: str = COST_MEASURES[0],
                step_reuse: bool = False, denoise: float = 1.0, block_cache: bool = False) -> io.NodeOutput:
        plan_name = plan_name.strip()
        if plan_name and plan_path(plan_name).exists() and not overwrite:  # fail before the long run, not after
            raise PlanError(f"FastAttn Calibrate: a plan named {plan_name!r} already exists; switch `overwrite` on "
                            "to replace it, or choose another plan name.")
        refuse_other_techniques(model, "Calibrate")
        enabled = {"ast": step_sharing, "wars+asc": window_residual and cfg_sharing, "wars": window_residual,
                   "full+asc": cfg_sharing}
        settings = Settings(delta, tuple(name for name, on in enabled.items() if on),
                            WindowSize(WINDOW_SHAPES[window_shape], window_fraction), search_mode, per_head, cost,
                            step_reuse, block_cache)
        plan, samples, layers = calibrate(model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
                                          sampler=sampler_name, scheduler=scheduler, settings=settings,
                                          denoise=denoise)
        if plan_name:
            save_plan(plan, plan_name, overwrite)
        latent = {**latent_image, "samples": samples}
        heatmap = image_tensor(render_heatmap(plan))
        table = cost_table(layers)
        shown = "\n\n".join(text for text in (plan.check_summary(), table) if text)
        return io.NodeOutput(install(model, PlannedAttention(plan)), plan, plan.to_json(), latent, heatmap, table,
                             ui=ui.PreviewText(shown))


class PromptBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        prompt = "An encoded prompt (from your text encoder node)."
        return io.Schema(
            node_id="FastAttnPromptBatch",
            display_name="Prompt Batch for Calibration (DiTFastAttn)",
            category=CATEGORY,
            description="Stacks several encoded prompts into one batch, one prompt per latent row, for Calibrate's "
                        "positive: the plan is then chosen on every prompt, so it holds for more than one picture. "
                        "Give Calibrate a latent batch that is a multiple of the number of prompts (each prompt "
                        "with as many seeds). The prompts must encode to the same length.",
            inputs=[
                io.Conditioning.Input("conditioning_1", tooltip=prompt),
                io.Conditioning.Input("conditioning_2", tooltip=prompt),
                *[io.Conditioning.Input(f"conditioning_{number}", optional=True, tooltip=f"{prompt} Optional.")
                  for number in range(3, 3 + MORE_PROMPTS)],
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="The prompts as one batch: connect it "
                                            "to Calibrate's positive.")],
        )

    @classmethod
    def execute(cls, conditioning_1: list, conditioning_2: list, **more: list) -> io.NodeOutput:
        numbered = sorted(more, key=lambda name: int(name.rsplit("_", 1)[1]))
        given = [conditioning_1, conditioning_2] + [more[name] for name in numbered if more[name] is not None]
        return io.NodeOutput(batch_prompts(given))


class ApplyPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnApplyPlan",
            display_name="Apply Attention Plan (DiTFastAttn)",
            category=CATEGORY,
            description="Carries out a calibrated plan: the plan input if connected, else the pasted plan_json, "
                        "else the saved plan picked. Checked against the model when sampling starts; a run at other "
                        "noise levels (another step count, denoise below 1) uses the plan step calibrated at the same "
                        "noise level, with a warning shown under the sampler and this node (so does another token grid "
                        "than the calibration's).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion transformer the plan was calibrated for."),
                io.Combo.Input("plan_name", options=[NO_PLAN, *list_plans()], default=NO_PLAN,
                               tooltip="A plan saved by Calibrate (in your user folder, fastattn_plans)."),
                io.String.Input("plan_json", default="", multiline=True,
                                tooltip="Plan JSON pasted here travels inside the workflow file: the workflow "
                                        "reproduces the result on another machine with no other file."),
                PlanType.Input("plan", optional=True, tooltip="A plan straight from a Calibrate node."),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, plan_name: str, plan_json: str, plan: Plan | None = None) -> io.NodeOutput:
        refuse_other_techniques(model, "Apply Plan")
        if plan is None and plan_json.strip():
            plan = Plan.from_json(plan_json)
        elif plan is None and plan_name != NO_PLAN:
            plan = load_plan(plan_name)
        if plan is None:
            raise PlanError("FastAttn Apply Plan: no plan given; connect a Calibrate node's plan, paste plan JSON, "
                            "or pick a saved plan.")
        architecture = adapter_for(model.model.diffusion_model).name
        if architecture != plan.fingerprint.architecture:
            raise PlanError(f"FastAttn Apply Plan: the plan is for a {plan.fingerprint.architecture} model, this "
                            f"model is {architecture}; calibrate a plan for this model.")
        return io.NodeOutput(install(model, PlannedAttention(plan)))


PLAN_NODES: list[type[io.ComfyNode]] = [Calibrate, PromptBatch, ApplyPlan]
