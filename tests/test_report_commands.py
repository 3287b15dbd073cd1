"""`evaluate`, `tensorboard`, `runs` and `report` as commands, on the report tests' real
run folder (`conftest.report_run`): what they print, what they write, what they serve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, foreground_cli, run_cli
from reports import EXPERIMENTS, report_section, report_text
from sa2va_contract.layout import RUN_FILE
from sa2va_tui.report import render_markdown


@pytest.fixture
def run(report_run):
    return report_run


def test_evaluate_prints_and_keeps_the_table_that_the_report_shows(run):
    from sa2va_contract.evaluation import EvaluationTable

    from sa2va_tui.report.conclusions import interval_words
    from sa2va_tui.report.i18n import Translator

    printed = run["evaluated"].stdout
    assert "Evaluation on test" in printed and "val chose, test reports" in printed
    table = EvaluationTable.load(run["dir"] / "evaluation.json")
    # Piped, the table is plain Markdown, each row whole on its line.
    for row in table.rows:
        assert f"| {row.label} | {row.mean('dice'):.4f} ± {row.std('dice'):.3f} |" in printed, printed
    assert {"baseline", "best_fixed_prompt", "supervised_chooser", "prompt_policy", "postprocess_policy", "combined",
            "finetuned", "reward_rerank", "oracle_prompt"} <= {r.name for r in table.rows}
    section = report_section(report_text(run, "en"), "Evaluation")
    assert "Reported on the `test` split" in section and "the `val` split chose" in section
    for row in table.rows:
        assert f"| {row.label} | {row.mean('dice'):.4f} ± {row.std('dice'):.3f} |" in section
        if row.name != table.baseline:
            assert f" {interval_words(row.interval, Translator('en'))} |" in section
    zh = report_section(report_text(run, "zh"), "评估结果")
    assert f"| 提示选择策略 | {table.row('prompt_policy').mean('dice'):.4f}" in zh
    assert "Not evaluated yet" in render_markdown(run["before_evaluation"], "en")


def test_evaluate_refuses_a_run_with_nothing_finished(run, tmp_path):
    copy = Path(shutil.copytree(run["dir"], tmp_path / run["dir"].name, ignore=shutil.ignore_patterns("*.zip")))
    state = json.loads((copy / RUN_FILE).read_text())
    for exp in state["experiments"].values():
        exp["state"] = "failed"
    (copy / RUN_FILE).write_text(json.dumps(state))
    result = run_cli("evaluate", str(copy))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no experiment has finished yet" in result.stderr and "Traceback" not in result.stderr


# --- languages, formats, curves -------------------------------------------------------


def test_the_report_command_reads_files_without_torch_or_matplotlib(run):
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from sa2va_tui.cli import app\n"
        "from sa2va_tui import commands\n"
        f"result = CliRunner().invoke(app, ['report', {str(run['dir'])!r}, '--lang', 'zh'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert '成功指标' in result.output, result.output\n"
        f"result = CliRunner().invoke(app, ['report', {str(run['dir'])!r}, '--format', 'json'])\n"
        "assert result.exit_code == 0 and json.loads(result.output)['lang'] == 'en', result.output\n"
        "heavy = [m for m in ('torch', 'stable_baselines3', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr


def test_report_of_a_missing_run_is_one_line(tmp_path):
    result = run_cli("report", "nope", "--logs-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --- runs, tensorboard ------------------------------------------------------------------


def test_runs_lists_the_run_with_its_states_and_headline_dice_on_test(run):
    from sa2va_contract.evaluation import EvaluationTable
    from sa2va_tui.text import interval_text

    result = run_cli("runs", "--logs-dir", str(run["dir"].parent))
    assert result.returncode == 0, result.stderr
    table = EvaluationTable.load(run["dir"] / "evaluation.json")
    best = table.best()
    line = next(line for line in result.stdout.splitlines() if run["dir"].name in line)
    headline = f"{best.mean('dice'):.4f} {best.name} {interval_text(best.interval)} (val chose, test reports)"
    assert headline in line
    if not best.is_method:
        method = max((row for row in table.rows if row.is_method), key=lambda row: row.mean("dice"))
        assert f"; best method: {method.mean('dice'):.4f} {method.name} {interval_text(method.interval)}" in line
    for experiment in EXPERIMENTS:
        assert f"{experiment} finished" in result.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6} (state 0A: LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc")
def test_tensorboard_serves_every_experiment_on_localhost_only(run):
    port = _free_port()
    process = subprocess.Popen(foreground_cli("tensorboard", str(run["dir"]), "--port", str(port)), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # printed once TensorBoard answers; empty if the command ended
        assert line.startswith(f"TensorBoard at http://127.0.0.1:{port}/ with runs prompt_rl, postprocess_rl, "
                               "reward_net"), line or process.stderr.read()
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and nothing else
        served = _get_json(f"http://127.0.0.1:{port}/data/runs", timeout=60)
        for name in EXPERIMENTS:
            assert any(r == name or r.startswith(f"{name}/") for r in served), served
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl+C does
        process.wait(timeout=20)
    assert process.returncode == 0
    assert not _listening_addresses(port)


def _get_json(url: str, timeout: float):
    """TensorBoard lists runs once it has scanned the folders: ask until it has."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            runs = json.loads(response.read())
        if len(runs) >= len(EXPERIMENTS) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_tensorboard_on_a_port_in_use_is_one_line(run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("tensorboard", str(run["dir"]), "--port", str(port))
    assert result.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert result.stderr.count("\n") == 1
