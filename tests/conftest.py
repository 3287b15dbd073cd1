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
#: The step at which the report tests' run runs out of memory (prompt_rl).
OOM_AT_STEP = 150


def foreground_cli(*args: str) -> list[str]:
    """The console command as a terminal's foreground job runs it, for tests that send it
    SIGINT: with SIGINT's default action, whatever the tests inherited (a shell script's
    background job starts with SIGINT ignored, the command keeps it ignored as it should,
    and Ctrl+C would then never reach it)."""
    return [sys.executable, "-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('sa2va_tui.cli', run_name='__main__', alter_sys=True)", *args]


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
    """A mask cache holding every (image, prompt) pair that SMALL_RUN's experiments and
    their evaluation ask for (every split, every candidate prompt), filled once per session through the
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
    samples = [s for split in ("train", "val", "test") for s in load_split(config.dataset, split)]
    segmenter.warm(samples, config.backend.prompts)
    return folder


@pytest.fixture
def real_run(mask_cache, tmp_path) -> list[str]:
    """`--set` overrides for a small real run: SMALL_RUN, the shared mask cache, and a
    logs folder of the test's own."""
    return [*SMALL_RUN, f"backend.cache_dir={mask_cache}", f"run.logs_dir={tmp_path / 'logs'}"]


@pytest.fixture(scope="session")
def report_run(tmp_path_factory, mask_cache):
    """A real quick run for the report tests: its folder, a report read while it ran,
    and the reports, curves and evaluation made after it, through the real commands."""
    import pynvml

    from fake_nvml import FakeNvml
    from sa2va_contract.config import load_config
    from sa2va_tui.report import read_report
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    base = tmp_path_factory.mktemp("report")
    config = load_config(QUICK_CONFIG, [
        f"run.logs_dir={base / 'logs'}",
        f"prompt_rl.faults={{oom_at_step: {OOM_AT_STEP}, oom_min_batch_size: 32}}",
        # Smaller still, to keep the module within a minute on two cores: the images of
        # the session's mask cache, one epoch of the reward network. Its 30 fine-tuning
        # steps (a few seconds) are the training that the mid-run report is read during:
        # the PPO experiments train for a fraction of a second on an idle machine.
        "dataset.limit=8", f"backend.cache_dir={mask_cache}",
        "reward_net.reward={samples: 4, epochs: 1, batch_size: 64, perturbations_per_mask: 0}",
        "reward_net.finetune={steps: 30, batch_size: 2}",
    ])
    # No NVIDIA library, deterministically, whatever machine runs the tests.
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    supervisor = Supervisor(config, RunStore.create(config), nvml=nvml, gpu_record_interval=0.2)
    run_dir = supervisor.run_dir
    supervisor.start()
    try:
        mid = _report_while_running(supervisor)
        assert supervisor.wait(240), "the quick run did not finish in 4 minutes"
    finally:
        supervisor.shutdown()
    before_evaluation = read_report(run_dir)
    evaluated = run_cli("evaluate", str(run_dir), timeout=240)
    out = base / "out"
    reports = {
        lang: run_cli("report", str(run_dir), "--lang", lang, "-o", str(out / lang / "report.md"))
        for lang in ("en", "zh")
    }
    as_json = run_cli("report", str(run_dir), "--format", "json", "--lang", "zh", "-o", str(out / "report.json"))
    return {"dir": run_dir, "mid": mid, "before_evaluation": before_evaluation, "evaluated": evaluated,
            "reports": reports, "json": as_json, "out": out}


def _report_while_running(supervisor, timeout: float = 180.0):
    """The report as read from the run folder while an experiment trains."""
    import time

    from sa2va_tui.report import read_report

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not supervisor.done:
        data = read_report(supervisor.run_dir)
        if any(is_training(e) for e in data.experiments.values()):
            return data
        time.sleep(0.1)
    raise AssertionError("no experiment was seen training with an ETA")


def is_training(exp) -> bool:
    """Running, its process alive, with timesteps and time left."""
    return exp.shown_state == "running" and exp.pid is not None and bool(exp.remaining_s) and bool(
        exp.remaining_timesteps)


@pytest.fixture(scope="session")
def ray_cluster():
    """A three-node Ray cluster on 127.0.0.1 (`tests/ray_cluster.py`), started once for
    the tests that ask for it and stopped at the end of the session."""
    from ray_cluster import start_cluster

    cluster = start_cluster()
    yield cluster
    cluster.shutdown()
