"""Beside other attention overrides: newer hosts' (0.35 - 0.47) "Model Attention Backend" and "Model
Sparse Attention" install theirs on the same `optimized_attention_override` key; the sparse one
chains the override it found for the calls it declines and re-installs itself from ON_PREPARE_STATE
every step. The doubles below behave as those nodes do (written from their public source), in either
order with the pack's nodes. An override installed above ours inside the forward, and a CUDA graph
capture, make the techniques stand aside visibly instead of acting on wrong layers.
"""

from __future__ import annotations

import comfy.ldm.modules.attention
import comfy.patcher_extension
import comfy.samplers
import pytest
import torch
from harness import pack_import
from harness.chains import patched_with_nodes
from harness.models import build_model, conditioning, empty_latent, sample
from harness.reference_schedule import reference_model

patching = pack_import("patching")
state = pack_import("patching.state")
KEY = "optimized_attention_override"
ARCH, STEPS = "flux", 4
CHAIN = [{"technique": "window", "tokens": 3, "refresh_every": 2}, {"technique": "cfg", "start": 0.5}]


class AttentionBackendNode:
    """As "Model Attention Backend" (ModelPatcher.set_model_optimized_attention): a clone whose model
    options carry an override that ignores the backend handed to it and calls the chosen one."""

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, model):
        def chosen_attention(*args, **kwargs):
            self.calls += 1
            return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)

        def override(_replaced, *args, **kwargs):
            return chosen_attention(*args, **kwargs)

        patched = model.clone()
        patched.model_options["transformer_options"][KEY] = override
        return patched


class SparseAttentionNode:
    """As "Model Sparse Attention" (BlockSparseAttention): its override takes self-attention calls of
    at least `min_tokens` tokens at noise levels from `start_percent` on (computed exactly here, and
    counted) and hands every other call to the override it found, else to the host's backend; it puts
    itself on top of whatever is on the hook when applied and from ON_PREPARE_STATE every step (idempotent
    while on top), and resets in ON_CLEANUP."""

    def __init__(self, min_tokens: int, start_percent: float) -> None:
        self.min_tokens, self.start_percent = min_tokens, start_percent
        self.installed: set = set()
        self.taken = self.declined = self.prepared = self.cleanups = 0

    def _override(self, previous):
        def override(func, q, k, v, heads, mask=None, **kwargs):
            tokens = q.shape[2] if kwargs.get("skip_reshape") else q.shape[1]
            sigma = float(kwargs.get("transformer_options", {}).get("sigmas", torch.ones(1))[0])
            if mask is None and q.shape == k.shape and tokens >= self.min_tokens and sigma <= self.sigma_start:
                self.taken += 1
                return func(q, k, v, heads, mask=mask, **kwargs)
            self.declined += 1
            return func(q, k, v, heads, mask=mask, **kwargs) if previous is None else previous(func, q, k, v, heads,
                                                                                                mask=mask, **kwargs)
        return override

    def install(self, transformer_options: dict) -> None:
        current = transformer_options.get(KEY)
        if current in self.installed:
            return
        override = self._override(current)
        self.installed.add(override)
        transformer_options[KEY] = override

    def apply(self, model):
        self.sigma_start = float(model.get_model_object("model_sampling").percent_to_sigma(self.start_percent))
        patched = model.clone()
        self.install(patched.model_options["transformer_options"])
        patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE, "sparse", self.prepare)
        patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, "sparse", self.cleanup)
        return patched

    def prepare(self, patcher, timestep, model_options=None) -> None:
        if model_options is not None:  # hosts before 0.38 pass none (see newer_prepare_state)
            self.prepared += 1
            self.install(model_options["transformer_options"])

    def cleanup(self, patcher) -> None:
        self.cleanups += 1


@pytest.fixture(autouse=True)
def newer_prepare_state(monkeypatch):
    """Newer hosts call ON_PREPARE_STATE callbacks with the run's model options before the step's model
    calls; the bundled host (0.3.75) passes only the timestep. Emulated where it happens."""
    original = comfy.samplers._calc_cond_batch

    def calc_cond_batch(model, conds, x_in, timestep, model_options):
        for callback in model.current_patcher.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE):
            callback(model.current_patcher, timestep, model_options)
        return original(model, conds, x_in, timestep, model_options)

    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", calc_cond_batch)


def _run(model) -> torch.Tensor:
    return sample(model, conditioning(ARCH, 7, seed=1), conditioning(ARCH, 7, seed=2), empty_latent(ARCH, 16, 16),
                  steps=STEPS)


def _assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert (out - expected).abs().max() <= 2e-4 * expected.abs().max()


def _acted(patched) -> None:
    """Our techniques acted at every step and nothing stood aside."""
    report = patching.patch_of(patched).last_report
    assert report.steps_seen == set(range(STEPS)) and not report.stood_aside and not report.warnings
    assert {"window+residual", "window+residual + cfg sharing"} <= set(report.flops_by_technique)


@pytest.mark.parametrize("ours_first", [True, False])
def test_model_attention_backend_in_either_order(ours_first):
    model = build_model(ARCH)
    backend = AttentionBackendNode()
    patched = backend.apply(patched_with_nodes(model, CHAIN)) if ours_first else \
        patched_with_nodes(backend.apply(model), CHAIN)
    _assert_close(_run(patched), _run(reference_model(model, CHAIN, ARCH)))
    _acted(patched)
    report = patching.patch_of(patched).last_report
    calls = report.forwards * max(report.layers_per_forward)
    assert 0 < backend.calls < calls  # what we compute in full goes through the chosen backend; windows do not


@pytest.mark.parametrize("ours_first", [True, False])
def test_sparse_attention_reinstalling_itself_every_step_in_either_order(ours_first):
    """The sparse node re-installs itself over a backend node applied after it; ours still acts at every
    step, the sparse override runs below ours, and what it declines reaches the backend below it."""
    model = build_model(ARCH)
    sparse, backend = SparseAttentionNode(min_tokens=60, start_percent=0.3), AttentionBackendNode()
    if ours_first:
        patched = backend.apply(sparse.apply(patched_with_nodes(model, CHAIN)))
    else:
        patched = patched_with_nodes(backend.apply(sparse.apply(model)), CHAIN)
    _assert_close(_run(patched), _run(reference_model(model, CHAIN, ARCH)))
    _acted(patched)
    assert sparse.prepared == STEPS and len(sparse.installed) == 2  # once when applied, once over the backend
    assert sparse.taken > 0 and sparse.declined > 0 and backend.calls == sparse.declined
    assert sparse.cleanups >= 1


def test_an_override_installed_above_ours_inside_the_forward_makes_ours_stand_aside_visibly():
    """A pack that installs its override per forward (a DIFFUSION_MODEL wrapper), above ours, handling
    some calls itself: our layer numbers would be wrong, so the techniques stand aside and say so."""
    model = build_model(ARCH)
    handled = []

    def intrude(executor, *args, **kwargs):
        options = args[7]  # Flux's _forward(x, timestep, context, y, guidance, ref_latents, control, options)
        below = options.get(KEY)
        count = iter(range(1 << 30))

        def override(func, *call_args, **call_kwargs):
            if next(count) % 2:  # every second call it computes itself
                handled.append(1)
                return func(*call_args, **call_kwargs)
            return func(*call_args, **call_kwargs) if below is None else below(func, *call_args, **call_kwargs)

        options[KEY] = override
        return executor(*args, **kwargs)

    def with_intruder(m):
        m = m.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "intruder", intrude)
        return m

    patched = with_intruder(patched_with_nodes(model, CHAIN))
    assert torch.equal(_run(patched), _run(with_intruder(model)))
    report = patching.patch_of(patched).last_report
    assert handled and report.warnings == [state.DISPLACED] and report.stood_aside[state.DISPLACED] > 0


def test_a_cuda_graph_capture_makes_the_run_stand_aside_visibly(monkeypatch):
    """Captured, our per-step choices would be frozen into the graph and replays would skip our
    numbering: from the capture on the run uses the host's attention, with a warning."""
    model = build_model(ARCH)
    monkeypatch.setattr(state, "capturing_cuda_graph", lambda: True)
    patched = patched_with_nodes(model, CHAIN)
    assert torch.equal(_run(patched), _run(model))
    report = patching.patch_of(patched).last_report
    assert report.warnings == [state.CAPTURED] and report.stood_aside[state.CAPTURED] > 0
