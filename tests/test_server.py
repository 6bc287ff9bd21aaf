"""End to end through a real headless ComfyUI: the pack loads, its nodes are listed, graphs
run through the API queue, and a bad input gives a clear error without harming the server."""

from __future__ import annotations

import pytest
from harness import pack_import, pack_nodes
from harness.queue_mix import reported_phrases
from harness.server import ComfyServer

workflows = pack_import("demo.workflows")

def inspector_graph(caption: str, size: int = 512) -> dict:
    """API format: demo model + demo text encoder + SD3 empty latent -> Attention Inspector."""
    return {
        "1": {"class_type": "FastAttnDemoLoader", "inputs": {"model": pack_import("demo").DEMO_DIT}},
        "2": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": caption}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "FastAttnInspector", "inputs": {"model": ["1", 0], "positive": ["2", 0], "latent": ["3", 0]}},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(tmp_path_factory.mktemp("comfy")) as running:
        yield running


def test_object_info_lists_every_node_with_a_tooltip_on_every_input(server):
    info = server.get("/object_info")
    assert {name for name in info if name.startswith("FastAttn")} == set(pack_nodes())
    for name in pack_nodes():
        assert info[name]["category"].startswith("FastAttn"), name
        inputs = {**info[name]["input"]["required"], **info[name]["input"].get("optional", {})}
        assert inputs and all(spec[1].get("tooltip") for spec in inputs.values()), name
    unet_files = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    demo = pack_import("demo")
    assert demo.DIT_FILE not in unet_files and demo.UNET_FILE not in unet_files  # only the demo loader's


def test_inspector_graph_runs_through_the_queue(server):
    result = server.run(inspector_graph("a red circle on a white background", size=512))
    assert result.status == "success", result.error
    text = "".join(result.outputs("4")["text"])
    assert "Architecture: SD3 (MMDiT)" in text
    assert "Image tokens: 1024 (grid 32 x 32)" in text  # 512 px -> 64 latent -> 32 x 32 patches
    assert "Attention layers per forward: 4 (4 joint)" in text


def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(server):
    bad = server.run(inspector_graph("a red zeppelin on a white background"))
    assert bad.status == "error"
    assert bad.error["node_type"] == "FastAttnDemoTextEncode"
    assert "zeppelin" in bad.error["exception_message"]

    good = server.run(inspector_graph("a blue square on a white background", size=256))
    assert good.status == "success", good.error
    assert "Image tokens: 256 (grid 16 x 16)" in "".join(good.outputs("4")["text"])


@pytest.mark.parametrize("technique", list(workflows.TECHNIQUES))
def test_every_demo_workflow_runs_through_the_queue(server, technique):
    """The API twins of example_workflows/ (the unpatched branch and Compare Images beside the
    patched one), small and short: each saves its image, and its report names the technique, so it
    acted."""
    result = server.run(workflows.demo_graph(technique, size=128, steps=3, prefix=f"test_{technique}", compare=True))
    assert result.status == "success", result.error
    saved = result.outputs("save")["images"]
    assert len(saved) == 1 and saved[0]["filename"].startswith(f"test_{technique}")
    assert (server.output_dir / saved[0].get("subfolder", "") / saved[0]["filename"]).stat().st_size > 0
    if technique == "baseline":
        assert "report" not in result.history["outputs"]
        return
    report = "".join(result.outputs("report")["text"])
    assert "attention FLOPs computed" in report
    assert reported_phrases(technique, steps=3) and all(phrase in report for phrase in reported_phrases(technique, 3))
    shown = "".join(result.outputs("compare")["text"])
    assert shown.startswith("image vs. reference, 32 x 32 px\nimage 1: PSNR ") and "SSIM" in shown, shown
    assert len(result.outputs("compare")["images"]) == 1  # the side-by-side preview


def test_the_demo_unet_deepcache_workflow_runs_through_the_queue(server):
    result = server.run(workflows.unet_graph(steps=4, prefix="test_unet_deepcache"))
    assert result.status == "success", result.error
    assert result.outputs("save")["images"][0]["filename"].startswith("test_unet_deepcache")
    assert "DeepCache (1:3 uniform, depth 0): 4 U-Net calls over 4 steps, 2 full and 2 shallow" in "".join(
        result.outputs("report")["text"])


def _saved_pixels(server, result, node_id: str) -> bytes:
    from PIL import Image

    saved = result.outputs(node_id)["images"][0]
    return Image.open(server.output_dir / saved.get("subfolder", "") / saved["filename"]).tobytes()


def test_a_plan_at_another_step_count_warns_on_the_sampler_the_apply_node_and_the_report(server):
    """The shipped plan was calibrated at 20 steps; sampled at 3, each step maps by noise level."""
    result = server.run_alone(workflows.demo_graph("plan", size=128, steps=3, prefix="test_mapped"))
    assert result.status == "success", result.error
    shown = [(m["data"]["node"], m["data"]["text"]) for m in result.messages if m["type"] == "progress_text"]
    warning = "the plan was calibrated at 20 steps (simple) and this run samples 3 steps at other noise levels"
    assert {node for node, text in shown if warning in text} == {"sampler", "fastattn0"}
    assert f"warning: {warning}" in "".join(result.outputs("report")["text"])


def test_a_workflow_calibrates_then_applies_and_a_saved_plan_is_listed_and_applied(server):
    result = server.run(workflows.calibrate_graph(size=128, steps=3, prefix="test_calibrate", plan_name="e2e plan"))
    assert result.status == "success", result.error
    assert _saved_pixels(server, result, "save") == _saved_pixels(server, result, "save_calibration")
    assert result.outputs("heatmap")["images"] and "attention FLOPs computed" in "".join(result.outputs("report")["text"])
    assert (server.scratch / "user" / "default" / "fastattn_plans" / "e2e plan.json").is_file()

    listed = server.get("/object_info/FastAttnApplyPlan")["FastAttnApplyPlan"]["input"]["required"]["plan_name"]
    assert "e2e plan" in listed[1]["options"]
    by_name = workflows.demo_graph("plan", size=128, steps=3, prefix="test_by_name")
    by_name["fastattn0"]["inputs"].update(plan_name="e2e plan", plan_json="")
    applied = server.run(by_name)
    assert applied.status == "success", applied.error
    assert _saved_pixels(server, applied, "save") == _saved_pixels(server, result, "save")

    again = server.run(workflows.calibrate_graph(size=128, steps=3, prefix="test_again", plan_name="e2e plan"))
    assert again.status == "error" and "already exists" in again.error["exception_message"]
