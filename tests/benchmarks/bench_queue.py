"""A busy API queue on a real headless ComfyUI: throughput and peak memory.

    .venv/bin/python tests/benchmarks/run_all.py queue

Queues the mix of tests/test_queue.py (every technique, chained techniques and the inspector
beside plain runs, 16 - 144 image tokens, batch 1 and 2, 3 steps, distinct seeds) all at once
on a fresh server after one warm-up prompt, and reports the wall time from the first POST to
the last result, prompts per second, the median time the server spent per prompt (from the
history's timestamps), and the server process's peak resident memory (VmHWM) before and after.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from harness.queue_mix import STEPS, mixed_prompts, workflows
from harness.server import ComfyServer

COUNT = 40  # sampling prompts in the mix (plus two inspector runs)


def _seconds_in_server(result) -> float:
    stamps = {kind: data.get("timestamp") for kind, data in result.history["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def main() -> None:
    prompts = mixed_prompts(COUNT, prefix="bench")
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch)) as server:
        warm = server.run(workflows.demo_graph("combined", size=128, steps=STEPS, prefix="warm_up"))
        assert warm.status == "success", warm.error
        memory_before = server.peak_memory_bytes()
        start = time.perf_counter()
        ids = [server.queue(graph) for graph in prompts.values()]
        results = [server.wait(prompt_id) for prompt_id in ids]
        wall = time.perf_counter() - start
        memory_after = server.peak_memory_bytes()
    failed = [r.prompt_id for r in results if r.status != "success"]
    assert not failed, f"prompts failed: {failed}"
    per_prompt = [_seconds_in_server(result) for result in results]
    print(f"{len(prompts)} prompts queued at once ({COUNT} sampling, {STEPS} steps, 16 - 144 image tokens, "
          f"batch 1-2; 2 inspector), demo model, CPU\n")
    print("| prompts | wall s | prompts/s | median s per prompt | peak RSS before MiB | peak RSS after MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(prompts)} | {wall:.1f} | {len(prompts) / wall:.2f} | {statistics.median(per_prompt):.2f} | "
          f"{memory_before / 2**20:.0f} | {memory_after / 2**20:.0f} |")


if __name__ == "__main__":
    main()
