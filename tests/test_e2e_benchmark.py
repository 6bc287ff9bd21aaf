"""tests/benchmarks/bench_e2e_gpu.py runs only where a GPU is lent: its --smoke mode (tiny models on
the CPU) keeps the whole script working here, its correctness check included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_e2e_gpu.py"


def test_e2e_gpu_benchmark_runs_every_row_in_smoke_mode(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "e2e_gpu.json").read_text())
    # the check: every row of one model against the float64 reference schedule or the CPU backends
    checks = results["checks"]
    assert [c["verdict"] for c in checks] == ["ok"] * len(checks) and len(checks) == 7, checks
    against = {c["row"]: c["against"] for c in checks}
    assert against["combined"].startswith("float64 reference") and "CPU backends" in against["CLEAR r16"]
    # every model, every row: sampled end to end, FLOPs reported for the pack's rows
    assert [c["case"] for c in results["cases"]] == [
        "FLUX.1-dev 1024^2", "FLUX.1-dev 2048^2", "Wan 2.1 1.3B 480p x 81", "SD3.5 Large 1024^2"]
    for case in results["cases"]:
        rows = case["rows"]
        assert len(rows) == (7 if case["case"].startswith("FLUX") else 8), case
        for name, row in rows.items():
            assert len(row["seconds"]) == 1 and "note" not in row, (case["case"], name, row)
            assert (row["flops_kept"] is None) == (name in ("unpatched", "LazyCache 0.2")), (name, row)
        assert 0 < case["attention_share"] < 1
    assert (tmp_path / "e2e_gpu.md").read_text().count("| SD3.5 Large 1024^2 | CLEAR r16 | 1 |") == 1
