"""A busy API queue on a real headless ComfyUI: over twenty prompts queued at once, mixing every
FastAttn node with plain runs, give exactly what each prompt gives when run alone; an interrupt
mid-run and a bad input to each of our nodes leave the queue working."""

from __future__ import annotations

import re

import numpy as np
import pytest
from harness.queue_mix import STEPS, bad_prompts, mixed_prompts, workflows
from harness.server import ComfyServer, PromptResult
from PIL import Image

LONG_STEPS = 40  # the run that gets interrupted: long enough to be caught mid-sampling
WALL_TIME = re.compile(r"in [\d.]+ s of sampling wall time")  # the one figure of a report that varies by run


def _outputs(server: ComfyServer, result: PromptResult) -> dict:
    """Every node's output as comparable values: saved images as uint8 arrays, texts as strings
    (the Attention Report's wall time masked)."""
    found = {}
    for node_id, output in result.history["outputs"].items():
        for index, saved in enumerate(output.get("images", [])):
            path = server.output_dir / saved.get("subfolder", "") / saved["filename"]
            found[f"{node_id}.image{index}"] = np.asarray(Image.open(path).convert("RGB"))
        if "text" in output:
            found[f"{node_id}.text"] = WALL_TIME.sub("in (time) s of sampling wall time", "".join(output["text"]))
    return found


def _assert_same(name: str, got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), name
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(got[key], value), f"{name}: {key} differs from the prompt run alone"
        else:
            assert got[key] == value, f"{name}: {key} differs from the prompt run alone"


def _renamed(graph: dict, prefix: str) -> dict:
    """The same graph saving under another file name (the images are read back from disk)."""
    if "save" not in graph:
        return graph
    save = graph["save"]
    return {**graph, "save": {**save, "inputs": {**save["inputs"], "filename_prefix": prefix + save["inputs"]["filename_prefix"]}}}


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """Everything queued at once, then the good prompts again one by one, each from scratch."""
    prompts = mixed_prompts()
    bad = bad_prompts()
    long_run = workflows.demo_graph("window_residual", size=512, steps=LONG_STEPS, prefix="long")
    after = {f"after{i}_{t}": workflows.demo_graph(t, size=192, steps=STEPS, prefix=f"after{i}_{t}", seed=77 + i)
             for i, t in enumerate(("window_residual", "combined"))}
    with ComfyServer(tmp_path_factory.mktemp("busy")) as server:
        ws = server.connect()
        try:
            queued = {}
            for index, (name, graph) in enumerate(prompts.items()):
                queued[name] = server.queue(graph)
                if index % 4 == 3 and bad:  # bad prompts interleaved with good ones, between pairs
                    bad_name = next(iter(bad))
                    queued[f"bad_{bad_name}"] = server.queue(bad.pop(bad_name).graph)
            queued.update({f"bad_{name}": server.queue(prompt.graph) for name, prompt in bad.items()})
            queued["long"] = server.queue(long_run)
            queued.update({name: server.queue(graph) for name, graph in after.items()})
            server.wait_for_step(ws, queued["long"], 3)
            server.post("/interrupt", {"prompt_id": queued["long"]})
        finally:
            ws.close()
        results = {name: server.wait(prompt_id) for name, prompt_id in queued.items()}
        outputs = {name: _outputs(server, result) for name, result in results.items() if result.status == "success"}
        expected = {name: _outputs(server, server.run_alone(_renamed(graph, "alone_")))
                    for name, graph in {**prompts, **after}.items()}
    return results, outputs, expected


def test_more_than_twenty_prompts_queued_at_once(busy):
    results, _, _ = busy
    assert len(results) >= 20


@pytest.mark.parametrize("name", [*mixed_prompts(), "after0_window_residual", "after1_combined"])
def test_each_queued_prompt_gives_what_it_gives_alone(busy, name):
    results, outputs, expected = busy
    assert results[name].status == "success", results[name].error
    _assert_same(name, outputs[name], expected[name])


REPORTED_AS = {"window_residual": ["window+residual"], "step_sharing": ["step sharing"],
               "cfg_sharing": ["cfg sharing"], "combined": ["window+residual + cfg sharing"], "baseline": []}


def test_queued_prompts_really_sampled_and_patched(busy):
    """The comparison above is not vacuous: the batch sizes show in the images, and every
    technique acted in its runs (the report of each run names it)."""
    _, outputs, _ = busy
    batched = [name for name, found in outputs.items() if "save.image1" in found]
    assert batched, "no prompt with batch size 2 saved two images"
    for name, graph in mixed_prompts().items():
        technique = graph.get("save", {}).get("inputs", {}).get("filename_prefix", "").split("_", 1)[-1]
        for phrase in REPORTED_AS.get(technique, []):
            assert phrase in outputs[name]["report.text"], (name, outputs[name]["report.text"])


def test_interrupt_mid_run_then_the_next_prompts_run_correctly(busy):
    results, _, _ = busy
    long = results["long"]
    assert long.status == "error" and long.interrupted, long.messages
    assert "save" not in long.history["outputs"]
    # after0/after1 reuse the interrupted run's patched model (same node inputs, cached): the
    # parametrized comparison above checks their images and reports against runs alone.
    assert results["after0_window_residual"].status == "success"


@pytest.mark.parametrize("name", list(bad_prompts()))
def test_bad_input_to_each_node_is_a_clear_execution_error(busy, name):
    results, _, _ = busy
    result, bad = results[f"bad_{name}"], bad_prompts()[name]
    assert result.status == "error", f"{name} ran: {result.history['outputs']}"
    assert result.error is not None, result.messages
    assert result.error["node_type"] == bad.node_type
    assert bad.says in result.error["exception_message"], result.error["exception_message"]
