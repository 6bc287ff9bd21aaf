"""Run independent pieces of CPU work on all cores, one intra-op thread each.

Window attention is hundreds of small kernel calls; letting each call split itself across
cores costs a synchronisation per call, and on a busy machine a core that waits for a
descheduled peer spins. Giving every core its own queue of whole head chunks instead keeps
each kernel call single-threaded (ATen releases the GIL), with no synchronisation between them.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastattn-kernels")


def workers(device: torch.device) -> int:
    """How many pieces run at once: the intra-op thread count on CPU, else 1."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def run_all(work: Callable[[T], None], items: Sequence[T], device: torch.device) -> None:
    """Call `work` on every item; on CPU spread over the cores, each at one intra-op thread."""
    count = workers(device)
    if count == 1 or len(items) == 1:
        for item in items:
            work(item)
        return

    # Grad and inference mode are per thread: the workers run in the caller's (ComfyUI samples
    # under inference mode, and its tensors may only be written under it).
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def single_threaded(item: T) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(item)

    try:
        for _ in _pool(count).map(single_threaded, items):
            pass
    finally:
        torch.set_num_threads(count)  # the setting is process-wide: restore it for the caller
