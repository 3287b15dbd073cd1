"""`run.on_event`: the notification command of a real run gets its variables, and
nothing of the run reaches its command line."""

from __future__ import annotations

import json
import shlex
import sys
import time

import pytest

from conftest import QUICK_CONFIG, run_cli
from sa2va_contract.config import ConfigError, load_config
from sa2va_contract.events import Failed, Finished, Restarting
from sa2va_tui.notify import NOTIFICATIONS_LOG, Notifier, notification_of
from sa2va_tui.runstate import ExperimentState

HOOK = "import json, os, sys; print(json.dumps([sys.argv[1:], {k: v for k, v in os.environ.items() if k.startswith('SA2VA_')}]))"


def hook_command(*args: str) -> str:
    return shlex.join([sys.executable, "-c", HOOK, *args])


def test_which_events_notify():
    failed, restarting = ExperimentState("a", state="failed"), ExperimentState("a", state="restarting")
    assert notification_of(Finished("a"), ExperimentState("a", state="finished")) == "finished"
    assert notification_of(Failed("a", kind="error", message="x"), failed) == "failed"
    assert notification_of(Failed("a", kind="oom", message="x"), restarting) is None  # a restart follows
    assert notification_of(Restarting("a", reason="oom", attempt=2), restarting) == "oom_restart"
    assert notification_of(Restarting("a", reason="manual", attempt=2), restarting) is None


def test_a_hostile_experiment_name_never_reaches_the_command_line(tmp_path):
    notifier = Notifier(hook_command("fixed"), "run-1", tmp_path, states=dict)
    notifier.notify("x; touch pwned", "finished", "finished").wait(30)
    argv, env = json.loads((tmp_path / NOTIFICATIONS_LOG).read_text())
    assert argv == ["fixed"] and env["SA2VA_EXPERIMENT"] == "x; touch pwned"
    assert not (tmp_path / "pwned").exists()


def test_a_command_that_does_not_parse_is_one_line_in_the_config():
    with pytest.raises(ConfigError, match="run.on_event: not a command line"):
        load_config(None, ["run.on_event='echo \"unclosed'"])


def test_a_real_run_notifies_on_finish_and_on_an_oom_restart(real_run, tmp_path):
    logs = tmp_path / "logs"
    result = run_cli("launch", "--headless", "-c", str(QUICK_CONFIG), *[f"--set={o}" for o in real_run],
                     "--set", "reward_net.enabled=false", "--set", "postprocess_rl.enabled=false",
                     "--set", "prompt_rl.faults={oom_at_step: 100, oom_min_batch_size: 32}",
                     # A YAML string: the value of --set is read as YAML, like every override.
                     "--set", f"run.on_event={json.dumps(hook_command('ping'))}", "--set", f"run.logs_dir={logs}",
                     timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = [p for p in logs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    log = run_dir / NOTIFICATIONS_LOG
    deadline = time.monotonic() + 30  # hooks run beside the run; the last may still be starting
    while time.monotonic() < deadline and len(log.read_text().splitlines()) < 2:
        time.sleep(0.2)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [argv for argv, _ in calls] == [["ping"], ["ping"]]
    assert [(env["SA2VA_EXPERIMENT"], env["SA2VA_EVENT"], env["SA2VA_STATE"]) for _, env in calls] == [
        ("prompt_rl", "oom_restart", "restarting"), ("prompt_rl", "finished", "finished")]
    assert {env["SA2VA_RUN"] for _, env in calls} == {run_dir.name}
