"""Calibration on several prompts: their conditionings stacked into one batch, one prompt per latent row.

ComfyUI gives each latent row the row of the conditioning with its index (a conditioning of batch 1
is repeated to the latent batch; a longer one is cycled or cut to it, silently). So a batch of N prompts
and a latent batch of N (or k x N: each prompt with k seeds) calibrates on every prompt, and Calibrate
checks that the latent batch is a multiple of the prompts.
"""

from __future__ import annotations

import torch


def prompt_rows(conditioning: list) -> int:
    """How many prompts a conditioning holds: the batch of its tensors (1 for a prompt as encoded)."""
    return max((int(cond.shape[0]) for cond, _ in conditioning), default=1)


def batch_prompts(conditionings: list[list]) -> list:
    """One conditioning whose rows are the given prompts', in order. Each must be one encoded prompt (a
    single entry, as a text encoder makes it) of the same length and the same options; what differs is
    refused with a message saying what, as ComfyUI would otherwise pad, cut or mix the prompts silently."""
    for number, conditioning in enumerate(conditionings, start=1):
        if len(conditioning) != 1:
            raise ValueError(f"FastAttn Prompt Batch: conditioning_{number} holds {len(conditioning)} entries (a "
                             "combined or area conditioning); give each input one encoded prompt")
    tensors = [conditioning[0][0] for conditioning in conditionings]
    shapes = [tuple(tensor.shape[1:]) for tensor in tensors]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"conditioning_{number}: {shape[0]} tokens" for number, shape in enumerate(shapes, 1))
        raise ValueError(f"FastAttn Prompt Batch: the prompts encode to different lengths ({listed}); one batch "
                         "needs equal lengths: shorten or lengthen the prompts so that they encode alike")
    options = [conditioning[0][1] for conditioning in conditionings]
    keys = set(options[0])
    if any(set(other) != keys for other in options[1:]):
        raise ValueError("FastAttn Prompt Batch: the prompts carry different options (encoded by different text "
                         "encoders or nodes); encode every prompt the same way")
    return [[torch.cat(tensors), {key: _batched(key, [option[key] for option in options]) for key in options[0]}]]


def _batched(key: str, values: list) -> object:
    """One option of the batch: tensors stacked along the batch, anything else the same for every prompt."""
    if all(isinstance(value, torch.Tensor) for value in values):
        if len({tuple(value.shape[1:]) for value in values}) > 1:
            raise ValueError(f"FastAttn Prompt Batch: the prompts' {key!r} differ in shape; encode every prompt the "
                             "same way")
        return torch.cat(values)
    first = values[0]
    if any(value is not first and not _equal(value, first) for value in values[1:]):
        raise ValueError(f"FastAttn Prompt Batch: the prompts' {key!r} differ ({first!r} and others); a batch takes "
                         "one value for it: set it alike on every prompt")
    return first


def _equal(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # tensors inside lists and the like: not comparable as one
        return False
