"""The one door from the tool to engine code that runs in the tool's own process.

The commands that do engine work in-process (`evaluate`, `headroom`, `train-embedded`,
`check`, `check --deep`) call these functions, which import the engine only when called, so that
`sa2va-tui --help` and the app stay light. Nothing else in `sa2va_tui` imports
`experiments`: the project's import contracts check it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sa2va_contract.config import Config
    from sa2va_contract.evaluation import EvaluationTable


def evaluate_run(config: "Config", run_dir: Path, split: str | None,
                 on_progress: Callable[[int, int], None] | None = None) -> "EvaluationTable":
    """Score the run's baselines and models on `split` (None: the reported split, test
    where there is one) and save the table in the run folder."""
    from experiments.evaluate import evaluate_run as evaluate

    return evaluate(config, run_dir, split, on_progress=on_progress)


def embedded_weights() -> Path:
    """The embedded model's weights as shipped in the package."""
    from experiments.backends.base import EMBEDDED_WEIGHTS

    return EMBEDDED_WEIGHTS


def train_embedded(config: "Config", target: Path, minutes_budget: float | None) -> dict[str, Any]:
    """Train the embedded model from scratch; returns its summary."""
    from experiments.backends.train_embedded import train_embedded as train

    return train(config, target, minutes_budget=minutes_budget, progress=True)


def print_headroom(config: "Config", split: str, train_images: int) -> None:
    from experiments.headroom import print_headroom as headroom

    headroom(config, split, train_images)


def mask_fill_estimate(config: "Config", replicas: int, gpus: int) -> str:
    """`check` on Sa2VA: how long the run's mask stage takes on a cold cache, with
    `replicas` models over `gpus` GPUs (`launching.mask_stage_gpus`)."""
    from experiments.mask_needs import SA2VA_SECONDS_PER_PAIR, fill_estimate

    return fill_estimate(config, SA2VA_SECONDS_PER_PAIR, replicas, gpus, measured=False)


def deep_check(config: "Config", echo: Callable[[str], None], replicas: int = 1, gpus: int = 1) -> str | None:
    """`check --deep` on the configured Sa2VA checkpoint: the one line of its failure,
    None when every step passed. `replicas` over `gpus`: the mask stage's layout, for
    its fill estimate at the measured time per mask."""
    from experiments.backends.sa2va import BackendError
    from experiments.backends.sa2va_deep_check import run_deep_check

    try:
        run_deep_check(config, echo, replicas, gpus)
    except BackendError as err:
        return str(err)
    return None


def check_data_and_model(config: "Config") -> Any:
    """What `check` finds about the dataset and the model: an `experiments.preflight.Preflight`."""
    from experiments.preflight import check_data_and_model as check

    return check(config)


def sa2va_loader() -> str | None:
    """The "module:function" that loads Sa2VA instead of transformers (the tests'
    stand-in), None for the real loader."""
    from experiments.backends.sa2va_families import loader_override

    return loader_override()
