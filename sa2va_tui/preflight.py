"""What `sa2va-tui check` verifies: the config and everything it points to, before a
run spends an hour finding out. The data and the model are checked by the engine
(through `engine`), the GPUs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sa2va_contract.config import Config
from sa2va_contract.files import weights_bytes
from sa2va_tui import engine
from sa2va_tui.gpus import read_gpus


def preflight(config: Config) -> Any:
    """An `experiments.preflight.Preflight`: what was found, warnings, problems."""
    report = engine.check_data_and_model(config)
    report.problems += folder_problems(config)
    if config.run.backend == "ray":
        _check_ray(config, report)
    else:
        _check_gpus(config, report)
    if config.run.backend == "local" and config.backend.kind == "sa2va" and not report.problems \
            and engine.sa2va_loader() is None:
        _check_fits(config, report)
    names = ", ".join(config.experiments()) or "none"
    report.found.append(f"experiments: {names}")
    return report


def launch_problems(config: Config) -> list[str]:
    """What `launch` refuses to start with: the problems `check` finds in the data, the
    model and the rollout's memory (the GPUs and the cluster are left to the queue and
    the backend, which say so themselves)."""
    return [*folder_problems(config), *engine.check_data_and_model(config).problems]


def folder_problems(config: Config) -> list[str]:
    """The folders the run writes (its run folder under run.logs_dir, the mask cache)
    must be folders, or be creatable as ones: a file there, or above, fails the run at
    its first write."""
    problems = []
    for key, path in (("run.logs_dir", config.run.logs_dir), ("backend.cache_dir", config.backend.cache_dir)):
        if path is None:
            continue
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(f"{key}: {path}: not a folder" if existing == path else
                            f"{key}: {path}: {existing} is a file, not a folder")
    return problems


def _check_ray(config: Config, report: Any) -> None:
    """The cluster (`placement.ray_check`): its nodes, each request, the shared folder."""
    from sa2va_tui.placement.ray_check import check_cluster

    cluster = check_cluster(config)
    report.found += cluster.found
    report.problems += cluster.problems


def _check_gpus(config: Config, report: Any) -> None:
    snapshot = read_gpus()
    pinned = {name: exp.gpu for name, exp in config.experiments().items() if exp.gpu is not None}
    if not snapshot.available:
        report.found.append(f"gpus: {snapshot.message}; experiments run on the CPU")
        for name, gpu in pinned.items():
            report.problems.append(f"{name}.gpu: GPU {gpu} asked for, but {snapshot.message}")
        if config.backend.kind == "sa2va" and engine.sa2va_loader() is None:
            report.problems.append("backend.kind: sa2va needs a CUDA GPU (Sa2VA has no CPU path) and none is visible")
        return
    indices = {gpu.index for gpu in snapshot.gpus}
    report.found.append(f"gpus: {len(indices)} visible ({', '.join(str(g.index) + ' ' + str(g.name) for g in snapshot.gpus)})")
    for name, gpu in pinned.items():
        if gpu not in indices:
            report.problems.append(f"{name}.gpu: GPU {gpu} asked for, but only {sorted(indices)} exist")


def _check_fits(config: Config, report: Any) -> None:
    """A checkpoint larger than the freest GPU needs the split layout."""
    path = Path(str(config.backend.model_path)).expanduser()
    free = [g.memory_free for g in read_gpus().gpus if g.memory_free is not None]
    size = weights_bytes(path)
    if free and config.backend.device_map is None and size > max(free):
        report.warnings.append(f"backend.model_path: {path}: {size / 2**30:.0f} GiB of weights, more than the freest "
                               f"GPU's {max(free) / 2**30:.0f} GiB: set backend.device_map: split")
