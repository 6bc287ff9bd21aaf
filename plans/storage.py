"""Saved plans: one JSON file per plan in the host's user directory, beside the user's
workflows but in a folder of its own (the workflow browser lists only `workflows/`)."""

from __future__ import annotations

import re
from pathlib import Path

import folder_paths

from .schema import Plan, PlanError

FOLDER = "fastattn_plans"
NO_PLAN = "(none: use plan_json or the plan input)"  # Apply Plan's first choice in its list of saved plans
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}")


def plans_directory() -> Path:
    return Path(folder_paths.get_user_directory()) / "default" / FOLDER


def plan_path(name: str) -> Path:
    """The file of the plan called `name`; the name may not leave the plans folder."""
    name = name.removesuffix(".json")
    if NAME.fullmatch(name) is None or ".." in name:
        raise PlanError(f"FastAttn plan: {name!r} is not a usable plan name; use letters, digits, spaces, '_', '-' "
                        "or '.', starting with a letter or digit (at most 100 characters).")
    return plans_directory() / f"{name}.json"


def list_plans() -> list[str]:
    folder = plans_directory()
    return sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []


def save_plan(plan: Plan, name: str, overwrite: bool) -> Path:
    path = plan_path(name)
    if path.exists() and not overwrite:
        raise PlanError(f"FastAttn plan: a plan named {name!r} already exists ({path}); switch `overwrite` on to "
                        "replace it, or choose another plan name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json(), encoding="utf-8")
    return path


def load_plan(name: str) -> Plan:
    path = plan_path(name)
    if not path.is_file():
        raise PlanError(f"FastAttn plan: no saved plan named {name!r} in {path.parent}; calibrate one first "
                        "or paste its JSON into the node.")
    try:
        return Plan.from_json(path.read_text(encoding="utf-8"))
    except PlanError as error:
        raise PlanError(f"{error} (file {path})") from None
