"""DeepCache as a node: MODEL (a U-Net) in, patched clone out."""

from __future__ import annotations

from comfy_api.latest import io

from ..patching.deepcache import DeepCacheSettings, install
from ..patching.deepcache_schedule import SCHEDULES


class DeepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnDeepCache",
            display_name="DeepCache (U-Net)",
            category="FastAttn/DeepCache",
            description="Runs the full U-Net every cache_interval steps and, on the steps between, only its shallow "
                        "blocks on top of the deep feature cached at the last full step (DeepCache, 1:N inference). "
                        "For U-Net models: SD 1.5, SD 2.x, SDXL.",
            inputs=[
                io.Model.Input("model", tooltip="A U-Net model (from a checkpoint or diffusion model loader)."),
                io.Int.Input("cache_interval", default=3, min=1, max=1000,
                             tooltip="N: the full U-Net on every N-th step of the range, the shallow path on the N-1 "
                                     "steps between. 1 changes nothing."),
                io.Int.Input("cache_depth", default=0, min=0, max=64,
                             tooltip="Skip branch the shallow path stops at, counted from the shallowest (0: only the "
                                     "first input and the last output block run between full steps, the paper's "
                                     "choice and the fastest). Deeper branches recompute more and drift less."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where caching starts, as a noise level (ComfyUI's percent of the schedule); "
                                       "steps before it run the full U-Net."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where caching ends, as a noise level; steps after it run the full U-Net."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="uniform",
                               tooltip="uniform: every N-th step is full. non-uniform: as many full steps, denser "
                                       "around 30% of the range where the deep features change fastest (the "
                                       "paper's non-uniform 1:N)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, cache_interval: int, cache_depth: int, start_percent: float,
                end_percent: float, schedule: str) -> io.NodeOutput:
        settings = DeepCacheSettings(cache_interval, cache_depth, start_percent, end_percent, schedule)
        return io.NodeOutput(install(model, settings))


DEEPCACHE_NODES: list[type[io.ComfyNode]] = [DeepCache]
