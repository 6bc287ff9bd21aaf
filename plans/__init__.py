"""Plans: which DiTFastAttn technique each attention layer uses at each step, found by
calibration, stored as versioned JSON beside the user's workflows, applied by DiTFastAttn."""

from .apply import PlannedAttention
from .calibrate import MODES, Settings, calibrate
from .costs import COST_MEASURES
from .heatmap import render_heatmap
from .schema import CANDIDATES, TECHNIQUES, Plan, PlanError
from .storage import list_plans, load_plan, plans_directory, save_plan

__all__ = [
    "CANDIDATES",
    "COST_MEASURES",
    "MODES",
    "TECHNIQUES",
    "Plan",
    "PlanError",
    "PlannedAttention",
    "Settings",
    "calibrate",
    "list_plans",
    "load_plan",
    "plans_directory",
    "render_heatmap",
    "save_plan",
]
