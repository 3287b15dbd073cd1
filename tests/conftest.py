import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_CONFIG = ROOT / "configs" / "quick.yaml"

# Workers and tests share two cores: one torch thread each is as fast as two here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: The quick config made smaller still, for tests that run the real experiments in
#: real worker processes: each experiment finishes in seconds once its process has
#: imported torch and stable-baselines3 (about 3 s of the cost of every worker).
SMALL_RUN = (
    "dataset.limit=8",
    "prompt_rl.total_timesteps=256", "prompt_rl.checkpoint_every=64", "prompt_rl.eval_every=128",
    "prompt_rl.ppo={n_steps: 16, n_envs: 2, batch_size: 32, n_epochs: 2}",
    "postprocess_rl.total_timesteps=256", "postprocess_rl.checkpoint_every=64", "postprocess_rl.eval_every=128",
    "postprocess_rl.ppo={n_steps: 16, n_envs: 2, batch_size: 32, n_epochs: 2}",
    # 4 train images of 11 prompts: one batch of one epoch; val is 8 images at least.
    "reward_net.reward={samples: 4, epochs: 1, batch_size: 64, perturbations_per_mask: 0}",
    "reward_net.finetune={steps: 2, batch_size: 2}",
)
#: Timesteps that a PPO experiment of SMALL_RUN does not reach within any test: for one
#: that must still be running when the test acts on it (it is stopped at the end).
ENDLESS = 10_000_000


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console command in a fresh interpreter, as a researcher runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sa2va_tui.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def mask_cache(tmp_path_factory) -> Path:
    """A mask cache holding every (image, prompt) pair that SMALL_RUN's experiments ask
    for (train and val, every candidate prompt), filled once per session through the
    real model, so that the workers of every test read their masks from disk."""
    weights = ROOT / "experiments" / "backends" / "weights" / "embedded.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} is not there: real runs cannot load the model")
    from experiments.backends import make_cached_segmenter
    from experiments.datasets import load_split
    from sa2va_contract.config import load_config

    folder = tmp_path_factory.mktemp("mask_cache")
    config = load_config(QUICK_CONFIG, [*SMALL_RUN, f"backend.cache_dir={folder}"])
    segmenter = make_cached_segmenter(config)
    samples = load_split(config.dataset, "train") + load_split(config.dataset, "val")
    segmenter.warm(samples, config.backend.prompts)
    return folder


@pytest.fixture
def real_run(mask_cache, tmp_path) -> list[str]:
    """`--set` overrides for a small real run: SMALL_RUN, the shared mask cache, and a
    logs folder of the test's own."""
    return [*SMALL_RUN, f"backend.cache_dir={mask_cache}", f"run.logs_dir={tmp_path / 'logs'}"]
