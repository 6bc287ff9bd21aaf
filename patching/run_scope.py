"""One sampling run's state, reachable from every model call of the run and gone when it ends.

The attention runtime and DeepCache hook ComfyUI's OUTER_SAMPLE wrapper the same way: the guider
samples with a copy of its model options that holds the run's state under a key, and gets its own
options back however sampling ends (finished, failed or interrupted), so nothing outlives the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import comfy.model_patcher

from .timeline import Timeline


def sampled_timeline(executor, args: tuple, kwargs: dict) -> Timeline:
    """The noise levels the OUTER_SAMPLE call `executor(*args, **kwargs)` is about to sample."""
    guider = executor.class_obj
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    return Timeline.of(sigmas, guider.model_patcher.get_model_object("model_sampling"))


@contextlib.contextmanager
def run_in_options(guider, key: str, run: object) -> Iterator[None]:
    """`run` under `key` in the transformer options of a copy of the guider's model options, for
    as long as the block runs; the guider's own options afterwards."""
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][key] = run
    try:
        yield
    finally:
        guider.model_options = original
