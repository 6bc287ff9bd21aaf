"""Calibration on several prompts: Prompt Batch stacks encoded prompts one per latent row (the host then
gives each row its own prompt), refuses what it cannot stack, and Calibrate refuses a latent batch the
prompts do not divide (the host would cycle or cut them silently)."""

from __future__ import annotations

import comfy.sample
import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample

prompts_module = pack_import("plans.prompts")
nodes = pack_import("nodes.plans")

ARCH = "sd3"
STEPS = 3


def _batch(*conditionings: list, **optional: list) -> list:
    return nodes.PromptBatch.execute(*conditionings, **optional).result[0]


def test_prompt_batch_stacks_the_prompts_one_per_row_with_their_options():
    prompts = [conditioning("flux", 7, seed=seed) for seed in (1, 2, 3)]
    (context, options), = _batch(prompts[0], prompts[1], conditioning_3=prompts[2], conditioning_4=None)
    assert torch.equal(context, torch.cat([prompt[0][0] for prompt in prompts]))
    assert torch.equal(options["pooled_output"], torch.cat([prompt[0][1]["pooled_output"] for prompt in prompts]))
    assert options["guidance"] == prompts[0][0][1]["guidance"]
    assert prompts_module.prompt_rows([[context, options]]) == 3 and prompts_module.prompt_rows(prompts[0]) == 1


def test_prompt_batch_refuses_what_it_cannot_stack():
    one, longer = conditioning("flux", 7, seed=1), conditioning("flux", 9, seed=2)
    with pytest.raises(ValueError, match="different lengths .conditioning_1: 7 tokens, conditioning_2: 9 tokens"):
        _batch(one, longer)
    with pytest.raises(ValueError, match="conditioning_2 holds 2 entries"):
        _batch(one, one + conditioning("flux", 7, seed=3))
    other_guidance = [[one[0][0], {**one[0][1], "guidance": 1.0}]]
    with pytest.raises(ValueError, match="'guidance' differ"):
        _batch(one, other_guidance)
    with pytest.raises(ValueError, match="different options"):
        _batch(one, [[one[0][0], {"pooled_output": one[0][1]["pooled_output"]}]])


def test_each_latent_row_is_sampled_with_its_own_prompt():
    """What calibration on a batch relies on: row i of the latent meets prompt i (the host's behaviour)."""
    model = build_model(ARCH)
    prompts = [conditioning(ARCH, 7, seed=seed) for seed in (1, 2)]
    negative = conditioning(ARCH, 7, seed=9)
    latent = empty_latent(ARCH, 16, 16, batch=2)["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))

    def run(positive: list, rows: slice) -> torch.Tensor:
        return comfy.sample.sample(model, noise[rows], STEPS, 3.0, "euler", "simple", positive, negative,
                                   latent[rows], disable_pbar=True, seed=0)

    together = run(_batch(*prompts), slice(0, 2))
    for row, prompt in enumerate(prompts):
        assert torch.allclose(together[row:row + 1], run(prompt, slice(row, row + 1)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def _calibrate(positive: list, batch: int) -> tuple:
    args = dict(seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="simple", delta=0.5,
                search_mode="budget", step_sharing=True, window_residual=True, cfg_sharing=True,
                window_shape=next(iter(nodes.WINDOW_SHAPES)), window_fraction=0.125, plan_name="",
                overwrite=False)
    return nodes.Calibrate.execute(build_model(ARCH), positive, conditioning(ARCH, 7, seed=9),
                                   empty_latent(ARCH, 16, 16, batch=batch), **args).result


def test_calibrate_refuses_a_latent_batch_the_prompts_do_not_divide():
    prompts = _batch(conditioning(ARCH, 7, seed=1), conditioning(ARCH, 7, seed=2))
    with pytest.raises(ValueError, match="positive holds 2 prompts .a prompt batch. and the latent batch is 3"):
        _calibrate(prompts, batch=3)


def test_a_plan_calibrated_on_a_prompt_batch_reproduces_its_run():
    prompts = _batch(conditioning(ARCH, 7, seed=1), conditioning(ARCH, 7, seed=2))
    patched, plan, _, out, _, _ = _calibrate(prompts, batch=4)  # two prompts, two seeds each
    assert plan.calibration.latents == 4 and any(name != "full" for row in plan.methods for name in row)
    assert torch.equal(sample(patched, prompts, conditioning(ARCH, 7, seed=9), empty_latent(ARCH, 16, 16, batch=4),
                              steps=STEPS, seed=3), out["samples"])
