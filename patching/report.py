"""What the runtime saw during one sampling run: kept after the run for nodes, logs and tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels import TokenLayout

BLOCK_CACHE = "block cache"  # the report's technique for the attention calls of blocks block caching skipped


@dataclass(frozen=True)
class LayerRecord:
    layer: int
    kind: str
    heads: int
    head_dim: int
    q_len: int
    k_len: int
    layout: TokenLayout | None


@dataclass
class RunReport:
    architecture: str
    total_steps: int
    steps_seen: set[int] = field(default_factory=set)
    forwards: int = 0
    layers: list[LayerRecord] = field(default_factory=list)  # of the first forward
    layers_per_forward: set[int] = field(default_factory=set)
    batch_halves: set[tuple[int, ...]] = field(default_factory=set)
    # technique -> [attention FLOPs computed, FLOPs full attention would have computed]
    flops_by_technique: dict[str, list[int]] = field(default_factory=dict)
    # why a technique set for a call did not apply to it -> how many calls
    stood_aside: dict[str, int] = field(default_factory=dict)
    branch_note: str = ""  # whether sharing skips whole attention branches on this model
    layout_derived: bool = False  # no adapter: the layout comes from the model's description (text side unproven)
    projection_flops_saved: int = 0  # FLOPs of QKV / output projections not run on shared layers
    warnings: list[str] = field(default_factory=list)  # what the user should know about this run (shown on nodes)
    wall_seconds: float | None = None  # sampling start to end (the OUTER_SAMPLE wrapper), device work included
    forwards_reused: int = 0  # model calls answered by step reuse (step_reuse.py), not counted in `forwards`

    def count(self, technique: str, computed: int, full: int) -> None:
        tally = self.flops_by_technique.setdefault(technique, [0, 0])
        tally[0] += computed
        tally[1] += full

    def count_reused(self, how: str, step: int, full: int) -> None:
        """A model call answered by step reuse `how`: none of its `full` attention FLOPs computed."""
        self.forwards_reused += 1
        self.steps_seen.add(step)
        self.count("step reuse" if how == "reuse" else f"step reuse ({how})", 0, full)

    @property
    def computed_flops(self) -> int:
        return sum(computed for computed, _ in self.flops_by_technique.values())

    @property
    def full_flops(self) -> int:
        return sum(full for _, full in self.flops_by_technique.values())

    def summary(self) -> str:
        """One line for the log: what ran, and the attention FLOPs kept overall and per technique."""
        kept = 100.0 * self.computed_flops / self.full_flops if self.full_flops else 100.0
        parts = ", ".join(
            f"{name}: {computed / full:.0%} of its full cost on {full / self.full_flops:.0%} of the calls' work"
            for name, (computed, full) in sorted(self.flops_by_technique.items()) if full
        )
        branch = f"; {self.branch_note}" if self.branch_note else ""
        if self.projection_flops_saved:
            branch += f", {self.projection_flops_saved / 1e9:.3g} GFLOPs of projections saved"
        fallbacks = "".join(f"; stood aside on {count} calls: {reason}" for reason, count in sorted(self.stood_aside.items()))
        fallbacks += "".join(f"; warning: {warning}" for warning in self.warnings)
        reused_flops = sum(full for name, (_, full) in self.flops_by_technique.items() if name.startswith("step reuse"))
        reused = (f" (and {self.forwards_reused} answered by step reuse, {reused_flops / 1e9:.6g} GFLOPs of attention "
                  "not run)") if self.forwards_reused else ""
        blocks = self.flops_by_technique.get(BLOCK_CACHE, [0, 0])[1]
        if blocks:
            branch += (f"; block caching skipped blocks holding {blocks / 1e9:.6g} GFLOPs of attention (and their "
                       "projections and MLPs)")
        timed = "" if self.wall_seconds is None else f" in {self.wall_seconds:.2f} s of sampling wall time"
        return (
            f"{self.architecture}: {self.forwards} forwards{reused} over {len(self.steps_seen)}/{self.total_steps} steps{timed}, "
            f"{len(self.layers)} attention layers; attention FLOPs computed {kept:.1f}% of full, "
            f"{self.computed_flops / 1e9:.6g} of {self.full_flops / 1e9:.6g} GFLOPs ({parts}){branch}{fallbacks}"
        )
