"""`python -m benchmarks [NAME ...]`: speed and memory measurements, printed as tables.

Each benchmark is a module here with a `main() -> None` (or "module:function"); none is run by the tests,
because timings on a shared machine are noise to a pass/fail check. Ratios are
measured inside one run so that the machine's load cancels out.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "backend": "benchmarks.backend_speed",
    "ppo": "benchmarks.ppo_speed",
    "ui": "benchmarks.ui_speed",
    "supervisor": "benchmarks.supervisor_latency",
    "ray": "benchmarks.ray_speed",
    "run": "benchmarks.run_speed",
    "quit": "benchmarks.run_speed:quit_main",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="which to run (default: all)")
    args = parser.parse_args()
    for name in args.names or list(BENCHMARKS):
        print(f"\n== {name} ==")
        module, _, function = BENCHMARKS[name].partition(":")
        getattr(importlib.import_module(module), function or "main")()


if __name__ == "__main__":
    main()
