"""The layers of the house hold: the import contracts in pyproject.toml, checked by
import-linter on the real import graph (lazy imports inside functions included)."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_every_import_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "6 kept, 0 broken" in result.stdout, result.stdout[-2000:]
