"""What `sa2va-tui check` verifies: the config and everything it points to, before a
run spends an hour finding out. The data and the model are checked by the engine
(through `engine`), the GPUs here."""

from __future__ import annotations

from typing import Any

from sa2va_contract.config import Config
from sa2va_tui import engine
from sa2va_tui.gpus import read_gpus


def preflight(config: Config) -> Any:
    """An `experiments.preflight.Preflight`: what was found, warnings, problems."""
    report = engine.check_data_and_model(config)
    _check_gpus(config, report)
    names = ", ".join(config.experiments()) or "none"
    report.found.append(f"experiments: {names}")
    return report


def _check_gpus(config: Config, report: Any) -> None:
    snapshot = read_gpus()
    pinned = {name: exp.gpu for name, exp in config.experiments().items() if exp.gpu is not None}
    if not snapshot.available:
        report.found.append(f"gpus: {snapshot.message}; experiments run on the CPU")
        for name, gpu in pinned.items():
            report.problems.append(f"{name}.gpu: GPU {gpu} asked for, but {snapshot.message}")
        if config.backend.kind == "sa2va":
            report.problems.append("backend.kind: sa2va needs a CUDA GPU and none is visible")
        return
    indices = {gpu.index for gpu in snapshot.gpus}
    report.found.append(f"gpus: {len(indices)} visible ({', '.join(str(g.index) + ' ' + str(g.name) for g in snapshot.gpus)})")
    for name, gpu in pinned.items():
        if gpu not in indices:
            report.problems.append(f"{name}.gpu: GPU {gpu} asked for, but only {sorted(indices)} exist")
