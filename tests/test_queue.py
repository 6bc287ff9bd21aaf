"""A busy API queue on a real headless ComfyUI: over twenty prompts queued at once, mixing every
node of the pack with plain runs, give exactly what each prompt gives when run alone; an interrupt
mid-run and a bad input to each of our nodes leave the queue working."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from harness import comfy_path, pack_import, pack_nodes
from harness.host import PACK_DIR_NAME
from harness.queue_mix import (
    STEPS,
    bad_prompts,
    clear_file,
    mixed_prompts,
    other_node_prompts,
    reported_phrases,
    workflows,
)
from harness.server import ComfyServer, PromptResult
from PIL import Image

LONG_STEPS = 40  # the run that gets interrupted: long enough to be caught mid-sampling
WALL_TIME = re.compile(r"in [\d.]+ s of sampling wall time")  # the one figure of a report that varies by run


def _outputs(server: ComfyServer, result: PromptResult) -> dict:
    """Every node's output as comparable values: saved images (not previews) as uint8 arrays, texts as strings
    (the Attention Report's wall time masked)."""
    found = {}
    for node_id, output in result.history["outputs"].items():
        for index, saved in enumerate(image for image in output.get("images", []) if image.get("type") == "output"):
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
    """The same graph saving its images and distilled weights under other file names (the images
    are read back from disk; distillation never overwrites a file)."""
    renamed = json.loads(json.dumps(graph))
    for node in renamed.values():
        for name in ("filename_prefix", "filename"):
            if name in node["inputs"]:
                node["inputs"][name] = prefix + node["inputs"][name]
    return renamed


def _own_models(scratch) -> tuple[str, ...]:
    """Server arguments giving it a models folder of its own (CLEAR weights are read from and
    distilled into models/clear/), holding the CLEAR file the weights prompts load, and the pack."""
    (scratch / "custom_nodes").mkdir()
    (scratch / "custom_nodes" / PACK_DIR_NAME).symlink_to((comfy_path() / "custom_nodes" / PACK_DIR_NAME).resolve())
    (scratch / "models" / "clear").mkdir(parents=True)
    demo_model = pack_import("nodes.demo").load_demo_model()
    clear_file(demo_model, scratch / "models" / "clear")
    return ("--base-directory", str(scratch))


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """Everything queued at once, then the good prompts again one by one, each from scratch."""
    scratch = tmp_path_factory.mktemp("busy")
    prompts = {**mixed_prompts(), **other_node_prompts()}
    bad = bad_prompts()
    long_run = workflows.demo_graph("window_residual", size=512, steps=LONG_STEPS, prefix="long")
    after = {f"after{i}_{t}": workflows.demo_graph(t, size=192, steps=STEPS, prefix=f"after{i}_{t}", seed=77 + i)
             for i, t in enumerate(("window_residual", "combined"))}
    with ComfyServer(scratch, extra_args=_own_models(scratch)) as server:
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
            queue = server.get("/queue")
            waiting = len(queue["queue_running"]) + len(queue["queue_pending"])
            server.wait_for_step(ws, queued["long"], 3)
            server.post("/interrupt", {"prompt_id": queued["long"]})
        finally:
            ws.close()
        results = {name: server.wait(prompt_id) for name, prompt_id in queued.items()}
        outputs = {name: _outputs(server, result) for name, result in results.items() if result.status == "success"}
        expected = {name: _outputs(server, server.run_alone(_renamed(graph, "alone_")))
                    for name, graph in {**prompts, **after}.items()}
    return results, outputs, expected, waiting


def test_more_than_twenty_prompts_queued_at_once(busy):
    """The server held more than twenty of them at once (running or pending), the moment the last
    was queued."""
    _, _, _, waiting = busy
    assert waiting > 20


def test_every_node_of_the_pack_is_queued_and_given_a_bad_input():
    ours = set(pack_nodes())
    queued = {node["class_type"] for graph in {**mixed_prompts(), **other_node_prompts()}.values()
              for node in graph.values()}
    assert ours <= queued, sorted(ours - queued)
    no_bad_input = {"FastAttnDemoLoader"}  # its one input is a list choice the server checks before running
    assert {bad.node_type for bad in bad_prompts().values()} == ours - no_bad_input


@pytest.mark.parametrize("name", [*mixed_prompts(), *other_node_prompts(), "after0_window_residual", "after1_combined"])
def test_each_queued_prompt_gives_what_it_gives_alone(busy, name):
    results, outputs, expected, _ = busy
    assert results[name].status == "success", results[name].error
    _assert_same(name, outputs[name], expected[name])


def test_queued_prompts_really_sampled_and_patched(busy):
    """The comparison above is not vacuous: the batch sizes show in the images, and every
    technique acted in its runs (the report of each run names it)."""
    _, outputs, _, _ = busy
    batched = [name for name, found in outputs.items() if "save.image1" in found]
    assert batched, "no prompt with batch size 2 saved two images"
    assert reported_phrases("plan"), "the shipped plan computes every layer in full at these steps"
    checked = set()
    for name, graph in {**mixed_prompts(), **other_node_prompts()}.items():
        technique = graph.get("save", {}).get("inputs", {}).get("filename_prefix", "").split("_", 1)[-1]
        if technique in (*workflows.TECHNIQUES, "distill", "clear_weights", "deepcache"):
            for phrase in reported_phrases(technique):
                assert phrase in outputs[name]["report.text"], (name, outputs[name]["report.text"])
            checked.add(technique)
    assert checked == {*workflows.TECHNIQUES, "distill", "clear_weights", "deepcache"}


def test_interrupt_mid_run_then_the_next_prompts_run_correctly(busy):
    results, _, _, _ = busy
    long = results["long"]
    assert long.status == "error" and long.interrupted, long.messages
    assert "save" not in long.history["outputs"]
    # after0/after1 reuse the interrupted run's patched model (same node inputs, cached): the
    # parametrized comparison above checks their images and reports against runs alone.
    assert results["after0_window_residual"].status == "success"


@pytest.mark.parametrize("name", list(bad_prompts()))
def test_bad_input_to_each_node_is_a_clear_execution_error(busy, name):
    results, _, _, _ = busy
    result, bad = results[f"bad_{name}"], bad_prompts()[name]
    assert result.status == "error", f"{name} ran: {result.history['outputs']}"
    assert result.error is not None, result.messages
    assert result.error["node_type"] == bad.node_type
    assert bad.says in result.error["exception_message"], result.error["exception_message"]
