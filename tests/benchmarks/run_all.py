"""`make bench`: run every tests/benchmarks/bench_*.py in turn (each prints its own table).

Pass names to run only some: `python tests/benchmarks/run_all.py runtime kernels`; `--flags` go to the scripts.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> None:
    sys.path.insert(0, str(HERE.parent))  # the `harness` package
    import harness  # noqa: F401  (loads ComfyUI and the pack before any script imports `comfy`)
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    for script in scripts:
        print(f"\n### {script.name}\n", flush=True)
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main([arg for arg in sys.argv[1:] if not arg.startswith("--")])  # flags are for the scripts
