"""Chains of DiTFastAttn nodes as plain dicts, built by the pack's own nodes: the system under
test that `reference_schedule` (which imports nothing of the pack) is compared with.

A chain is a list of dicts, one per node in order: {"technique": "window" | "step" | "cfg",
"start", "end", "layers"} plus the node's own settings ("shape", "fraction", "tokens",
"refresh_every", "residual" for windows; "compute_every" for step sharing).
"""

from __future__ import annotations

from .host import pack_import


def patched_with_nodes(model, chain: list[dict]):
    """The model patched by the pack's own nodes, one per dict of `chain`, in order."""
    nodes = pack_import("nodes.ditfastattn")
    shapes = {value: key for key, value in nodes.WINDOW_SHAPES.items()}
    for spec in chain:
        scope = (spec.get("start", 0.0), spec.get("end", 1.0), spec.get("layers", ""))
        if spec["technique"] == "window":
            model = nodes.WindowResidualAttention.execute(
                model, shapes[spec.get("shape", "band")], spec.get("fraction", 0.125), spec.get("tokens", 0),
                spec.get("refresh_every", 2), spec.get("residual", True), *scope).result[0]
        elif spec["technique"] == "step":
            model = nodes.StepSharingAttention.execute(model, spec.get("compute_every", 2), *scope).result[0]
        else:
            model = nodes.CFGSharingAttention.execute(model, *scope).result[0]
    return model
