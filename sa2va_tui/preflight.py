"""What `sa2va-tui check` verifies: the config and everything it points to, before a
run spends an hour finding out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sa2va_tui.config import Config


@dataclass
class Preflight:
    found: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def preflight(config: Config) -> Preflight:
    report = Preflight()
    _check_dataset(config, report)
    _check_backend(config, report)
    _check_gpus(config, report)
    names = ", ".join(config.experiments()) or "none"
    report.found.append(f"experiments: {names}")
    return report


def _check_dataset(config: Config, report: Preflight) -> None:
    dataset = config.dataset
    if dataset.kind == "builtin":
        sizes = dataset.sizes
        limit = f", at most {dataset.limit} per split" if dataset.limit else ""
        report.found.append(
            f"dataset: built-in, {dataset.image_size}x{dataset.image_size}, "
            f"train/val/test {sizes.train}/{sizes.val}/{sizes.test}{limit}, seed {dataset.seed}"
        )
        return
    from experiments.datasets.folder import DatasetError, read_manifest, scan_split

    assert dataset.root is not None
    if not dataset.root.is_dir():
        report.problems.append(f"dataset.root: {dataset.root}: no such folder")
        return
    for split in ("train", "val", "test"):
        scan = scan_split(dataset.root, split)
        if split == "test" and not (dataset.root / split).exists():
            report.warnings.append(f"dataset: {dataset.root / split}: no test split (evaluate --split test will not work)")
            continue
        report.problems.extend(scan.problems)
        if scan.pairs:
            report.found.append(f"dataset: {dataset.root / split}: {len(scan.pairs)} image/mask pairs")
    if dataset.manifest is not None:
        try:
            described = read_manifest(dataset.manifest)
            report.found.append(f"dataset.manifest: {dataset.manifest}: {len(described)} expressions")
        except DatasetError as err:
            report.problems.extend(err.problems)


def _check_backend(config: Config, report: Preflight) -> None:
    backend = config.backend
    report.found.append(
        f"prompts: {len(backend.prompts)} candidates, default {backend.default_prompt}: {backend.prompts[backend.default_prompt]!r}"
    )
    if backend.kind == "embedded":
        from experiments.backends.base import EMBEDDED_WEIGHTS

        weights = backend.weights or EMBEDDED_WEIGHTS
        if Path(weights).is_file():
            report.found.append(f"backend: embedded model, weights {weights}")
        else:
            report.problems.append(f"backend.weights: {weights}: no such file (sa2va-tui train-embedded writes it)")
        return
    path = Path(str(backend.model_path)).expanduser()
    if not path.is_dir():
        report.problems.append(f"backend.model_path: {backend.model_path}: no such checkpoint folder")
    elif not (path / "config.json").is_file():
        report.problems.append(f"backend.model_path: {path}: not a transformers checkpoint (no config.json)")
    else:
        _check_sa2va_checkpoint(config, path, report)
    if backend.trust_remote_code:
        report.warnings.append(f"backend.trust_remote_code: the code shipped in {backend.model_path} will run")


def _check_sa2va_checkpoint(config: Config, path: Path, report: Preflight) -> None:
    """The family config.json names, and what it needs: one line per missing piece."""
    from experiments.backends import sa2va_families as families

    try:
        detected = families.detect_family(path, config.backend.family)
    except families.FamilyError as err:
        report.problems.append(str(err))
        return
    family = detected.family
    report.found.append(f"backend: sa2va checkpoint {path}: {family.label} ({detected.reason})")
    loader = families.loader_override()
    if loader is not None:
        report.warnings.append(f"backend: {families.LOADER_ENV}={loader} loads the model, not transformers: "
                               "its requirements and the CUDA GPU are not checked")
        return
    report.problems.extend(families.requirement_problems(family, path, families.installed(family)))
    if config.backend.device_map == "split" and not family.splittable:
        report.problems.append(f"backend.device_map: split exists upstream for InternVL-based checkpoints only, "
                               f"not {family.label}")
    _check_fits(config, path, report)


def _check_fits(config: Config, path: Path, report: Preflight) -> None:
    """A checkpoint larger than the freest GPU needs the split layout."""
    from experiments.backends.sa2va_families import weights_bytes
    from sa2va_tui.gpus import read_gpus

    free = [g.memory_free for g in read_gpus().gpus if g.memory_free is not None]
    size = weights_bytes(path)
    if free and config.backend.device_map is None and size > max(free):
        report.warnings.append(f"backend.model_path: {path}: {size / 2**30:.0f} GiB of weights, more than the freest "
                               f"GPU's {max(free) / 2**30:.0f} GiB: set backend.device_map: split")


def _check_gpus(config: Config, report: Preflight) -> None:
    from sa2va_tui.gpus import read_gpus

    snapshot = read_gpus()
    pinned = {name: exp.gpu for name, exp in config.experiments().items() if exp.gpu is not None}
    if not snapshot.available:
        report.found.append(f"gpus: {snapshot.message}; experiments run on the CPU")
        for name, gpu in pinned.items():
            report.problems.append(f"{name}.gpu: GPU {gpu} asked for, but {snapshot.message}")
        if config.backend.kind == "sa2va" and not _stand_in_loader():
            report.problems.append("backend.kind: sa2va needs a CUDA GPU (Sa2VA has no CPU path) and none is visible")
        return
    indices = {gpu.index for gpu in snapshot.gpus}
    report.found.append(f"gpus: {len(indices)} visible ({', '.join(str(g.index) + ' ' + str(g.name) for g in snapshot.gpus)})")
    for name, gpu in pinned.items():
        if gpu not in indices:
            report.problems.append(f"{name}.gpu: GPU {gpu} asked for, but only {sorted(indices)} exist")


def _stand_in_loader() -> bool:
    from experiments.backends.sa2va_families import loader_override

    return loader_override() is not None
