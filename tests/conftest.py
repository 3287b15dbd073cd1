import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_CONFIG = ROOT / "configs" / "quick.yaml"

# Workers and tests share two cores: one torch thread each is as fast as two here.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
