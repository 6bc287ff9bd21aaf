"""The benchmarks' first-block-cache baseline (tests/benchmarks/first_block_cache.py) on the demo
model: at threshold 0 it is the unpatched model bit for bit; at a large threshold it skips calls
(counted where the blocks run) and changes the image; its state lives in one sampling run only."""

from __future__ import annotations

import comfy.sd
import pytest
import torch
from benchmarks.first_block_cache import KEY, first_block_cache
from harness import pack_import
from harness.models import sample

demo = pack_import("demo")
demo_nodes = pack_import("nodes.demo")

STEPS = 6


@pytest.fixture(scope="module")
def model():
    return comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))


def run(model) -> tuple[torch.Tensor, int, int]:
    """A small CFG run; returns its latent and how often the first and the last joint block ran."""
    blocks = model.get_model_object("diffusion_model").joint_blocks
    calls = {"first": 0, "last": 0}
    hooks = [blocks[0].register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1)),
             blocks[-1].register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))]
    try:
        positive = demo_nodes.FastAttnDemoTextEncode.execute("a red circle on a striped green background").result[0]
        negative = demo_nodes.FastAttnDemoTextEncode.execute("").result[0]
        out = sample(model, positive, negative, {"samples": torch.zeros(1, 16, 16, 16)}, steps=STEPS, cfg=4.0, seed=3)
    finally:
        for hook in hooks:
            hook.remove()
    return out, calls["first"], calls["last"]


def test_threshold_zero_is_the_unpatched_model_bit_for_bit(model):
    reference, first, last = run(model)
    out, patched_first, patched_last = run(first_block_cache(model, 0.0))
    assert torch.equal(out, reference)
    assert patched_first == patched_last == first == last > 0


def test_a_large_threshold_skips_calls_and_changes_the_image(model):
    reference, full_calls, _ = run(model)
    patched = first_block_cache(model, 10.0)
    out, first, last = run(patched)
    assert first == full_calls
    assert 0 < last < first - 1  # the first call of each batch layout runs in full, most others skip
    assert not torch.equal(out, reference)
    # the run's caches went with it: the clone keeps only its threshold, and a second run is the same
    assert patched.model_options["transformer_options"][KEY] == 10.0
    again, _, again_last = run(patched)
    assert torch.equal(again, out) and again_last == last
