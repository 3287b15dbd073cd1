"""The status report, `evaluate`, `tensorboard` and `runs`, on a real run folder.

One short real run per module (configs/quick.yaml: the three experiments through the
real supervisor and real worker processes, with an out-of-memory error injected into
prompt_rl and the restart that answers it), read mid-run and after. Each section is
checked against the run's own data: run.json, events.jsonl, progress.csv, the
TensorBoard event files, evaluation.json.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OOM_AT_STEP, QUICK_CONFIG, is_training
from fake_nvml import GiB, FakeGpu, FakeNvml
from sa2va_tui.analysis import hints, reward_trend
from sa2va_contract.config import load_config
from sa2va_contract.events import Checkpoint, Failed, GpuSample, Restarting
from sa2va_tui.gpus import Nvml
from sa2va_tui.report import read_report, render_json, render_markdown
from sa2va_tui.report.curves import curve_path
from sa2va_tui.report.facts import metric_series
from sa2va_tui.report.i18n import MESSAGES
from sa2va_tui.text import format_duration
from sa2va_tui.runstate import EPISODE_REWARD
from sa2va_contract.layout import RUN_FILE
from sa2va_tui.runstore import RunStore, load_run, read_events, read_gpu_samples
from sa2va_tui.supervisor import Supervisor
from reports import EXPERIMENTS, report_section, report_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Words that stay as they are in a Chinese report: names of things, not sentences.
PROPER_NOUNS = {"GPU", "CPU", "PPO", "CNN", "Dice", "IoU", "Recall", "Precision", "NVIDIA", "TensorBoard", "GiB",
                "MiB", "KiB"}



@pytest.fixture
def run(report_run):
    return report_run


def _english_words(markdown: str) -> set[str]:
    """Words of two letters or more left once code (identifiers, paths, commands) and
    image links are taken out."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)
    return set(re.findall(r"[A-Za-z]{2,}", text))


# --- the run itself ---------------------------------------------------------------------


def test_the_run_finished_after_its_injected_oom_was_restarted(run):
    states = load_run(run["dir"]).experiments
    assert {name: s.state for name, s in states.items()} == dict.fromkeys(EXPERIMENTS, "finished")
    assert states["prompt_rl"].oom_restarts == 1
    assert run["evaluated"].returncode == 0, run["evaluated"].stderr


# --- sections, against the run's data ---------------------------------------------------


def test_overview_and_experiment_sections_tell_run_json(run):
    data = read_report(run["dir"])
    markdown = render_markdown(data, "en")
    overview = report_section(markdown, "Overview")
    for name, s in load_run(run["dir"]).experiments.items():
        row = next(line for line in overview.splitlines() if f"`{name}`" in line)
        assert f"| finished | CPU | {s.timesteps}/{s.total} (100%) |" in row
        reward = "-" if s.episode_reward is None else format(s.episode_reward, ".4g")
        assert row.endswith(f"| {reward} |")
        section = report_section(markdown, f"Experiment `{name}`")
        assert "- State: finished\n- Process id: -\n" in section
        assert f"batch size: {s.batch_size}, attempts: {s.attempts}" in section
        for key, value in s.metrics.items():
            if f"`{key}`" in section:
                assert re.search(rf"`{re.escape(key)}` \| \S+ \|", section)
        rewards = [v for _, v in data.experiments[name].series.get(EPISODE_REWARD, [])]
        for hint in hints(s.metrics, rewards):
            assert f"- {hint.text}" in section
        log = run["dir"] / name / "train.log"
        assert f"`tail -f {log}`" in section
        assert f"`sa2va-tui tensorboard {run['dir']}`" in section
    assert "batch size: 16, attempts: 2" in report_section(markdown, "Experiment `prompt_rl`")
    assert "reward/spearman" in report_section(markdown, "Experiment `reward_net`")


def test_a_report_read_mid_run_shows_live_processes_and_their_eta(run):
    mid = run["mid"]
    assert mid.live and mid.supervisor_pid == os.getpid()
    exp = next(e for e in mid.experiments.values() if is_training(e))
    assert exp.pid == exp.state.pid != os.getpid()
    assert exp.remaining_timesteps == exp.state.total - exp.state.timesteps > 0
    assert exp.finish_at == pytest.approx(mid.generated_at + exp.remaining_s)
    markdown = render_markdown(mid, "en")
    assert f"Running: supervisor pid {os.getpid()}" in markdown
    assert f"| `{exp.name}` | running |" in report_section(markdown, "Overview")
    assert f"- Process id: {exp.pid}\n" in report_section(markdown, f"Experiment `{exp.name}`")
    finish = report_section(markdown, "Expected finish")
    assert re.search(rf"\| `{exp.name}` \| running \| {exp.remaining_timesteps} \| [0-9.]+ \| "
                     rf"{re.escape(format_duration(exp.remaining_s))} \|", finish)
    assert f"`sa2va-tui status {mid.run_ref}`" in markdown
    zh = render_markdown(mid, "zh")
    assert f"正在运行：监督进程号 {os.getpid()}" in zh and f"| `{exp.name}` | 运行中 |" in zh


def test_curves_follow_progress_csv_across_the_oom_restart(run):
    series = metric_series(read_events(run["dir"]))
    for name in ("prompt_rl", "postprocess_rl"):
        with open(run["dir"] / name / "progress.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(EPISODE_REWARD)]
        expected = [(int(float(r["time/total_timesteps"])), float(r[EPISODE_REWARD])) for r in rows]
        got = series[name][EPISODE_REWARD]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected])
    steps = [s for s, _ in series["prompt_rl"]["time/fps"]]
    assert steps == sorted(set(steps))  # the failed attempt's steps past its checkpoint are gone


def test_problems_tell_the_oom_and_its_restart_from_events(run):
    events = list(read_events(run["dir"]))
    (oom,) = [e for e in events if isinstance(e, Failed)]
    (restart,) = [e for e in events if isinstance(e, Restarting)]
    assert oom.kind == "oom" and oom.step >= OOM_AT_STEP and oom.batch_size == 32
    assert restart.changes.to_json()["batch_size"] == [32, 16]
    checkpoint = Path(restart.changes.to_json()["resume_from"]).name
    assert checkpoint in {Path(e.path).name for e in events if isinstance(e, Checkpoint)}

    data = read_report(run["dir"])
    (problem,) = data.problems
    assert (problem.experiment, problem.kind, problem.step, problem.batch_size) == ("prompt_rl", "oom", oom.step, 32)
    problems = report_section(render_markdown(data, "en"), "Problems and how they were resolved")
    assert (f"`prompt_rl`: failed (out of memory) at step {oom.step}, batch size 32, on CPU: `{oom.message}`. "
            f"Restarted automatically after running out of memory (attempt 2): batch size 32 → 16; "
            f"resumed from checkpoint `{checkpoint}`. Now: finished.") in problems
    zh = report_section(render_markdown(data, "zh"), "问题及处理方式")
    assert f"在第 {oom.step} 步失败（显存不足），批大小 32" in zh and "批大小 32 → 16" in zh


def test_gpu_section_says_there_was_no_gpu(run):
    assert len(read_gpu_samples(run["dir"])) == 1  # without a GPU the sampler reports once, and stops
    data = read_report(run["dir"])
    assert data.gpu_available is False and "NVML library was not found" in data.gpu_message
    gpus = report_section(render_markdown(data, "en"), "GPU usage")
    assert f"No NVIDIA GPU (`{data.gpu_message}`): every experiment ran on the CPU." in gpus


def test_the_supervisor_keeps_a_gpu_sample_per_record_interval(real_run):
    """The GPU history the report reads: one sample kept per interval, not one per read."""
    config = load_config(QUICK_CONFIG, [*real_run, "postprocess_rl.enabled=false", "reward_net.enabled=false"])
    supervisor = Supervisor(config, RunStore.create(config), nvml=FakeNvml([FakeGpu(utilization=40)]),
                            gpu_interval=0.05, gpu_record_interval=0.5)
    started = time.monotonic()
    supervisor.start()
    try:
        assert supervisor.wait(120)
    finally:
        supervisor.shutdown()
    elapsed = time.monotonic() - started
    samples = read_gpu_samples(supervisor.run_dir)
    assert 2 <= len(samples) <= elapsed / 0.5 + 1
    assert all(s.available and s.gpus[0].utilization == 40 for s in samples)
    assert "| 0 | NVIDIA H100 80GB HBM3 | 40% |" in report_section(render_markdown(read_report(supervisor.run_dir)),
                                                             "GPU usage")


def test_gpu_section_and_steadiness_from_a_recorded_gpu_history(run, tmp_path):
    """GPU samples as the supervisor keeps them (read by the real NVML reader, from a
    stand-in driver): GPU 0 busy steadily, GPU 1 in bursts."""
    copy = Path(shutil.copytree(run["dir"], tmp_path / run["dir"].name))
    (copy / "gpus.jsonl").unlink()
    store = RunStore(copy)
    gpus = [FakeGpu(used=20 * GiB, processes={4242: 6 * GiB}), FakeGpu(used=30 * GiB, processes={4343: 9 * GiB})]
    workers = {4242: "prompt_rl", 4343: "reward_net"}
    for steady, bursty in ((60, 10), (62, 90), (58, 10), (61, 90)):
        gpus[0].utilization, gpus[1].utilization = steady, bursty
        store.append_gpu_sample(GpuSample.of(Nvml(FakeNvml(gpus)).read(workers)))
    data = read_report(copy)
    table = report_section(render_markdown(data, "en"), "GPU usage")
    assert "| 0 | NVIDIA H100 80GB HBM3 | 61% | 20.0 GiB / 80.0 GiB | `prompt_rl` (6.0 GiB) |" in table
    assert "| 1 | NVIDIA H100 80GB HBM3 | 90% | 30.0 GiB / 80.0 GiB | `reward_net` (9.0 GiB) |" in table
    assert "| mean 60%, spread 1.5 points, memory up to 20.0 GiB, over 4 samples |" in table  # 60, 62, 58, 61
    assert "| mean 50%, spread 40.0 points, memory up to 30.0 GiB, over 4 samples |" in table  # 10, 90, 10, 90
    steady = next(i for i in data.indicators if i.name == "gpu_steady")
    assert steady.status == "fail" and steady.facts["std"][0] < 20 < steady.facts["std"][1]


def test_expected_finish_and_comparison(run):
    data = read_report(run["dir"])
    markdown = render_markdown(data, "en")
    states = load_run(run["dir"]).experiments
    last = max(s.ended_at for s in states.values())
    finish = report_section(markdown, "Expected finish")
    assert f"The whole run finished at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}." in finish
    for name in EXPERIMENTS:
        assert re.search(rf"\| `{name}` \| finished \| 0 \| - \| 0s \|", finish)
    comparison = report_section(markdown, "Comparison of the experiments")
    for name in ("prompt_rl", "postprocess_rl"):
        metrics = states[name].metrics
        kl, ev = metrics["train/approx_kl"], metrics["train/explained_variance"]
        flagged = {h.key for h in hints(metrics)}
        stability = "large updates" if "train/approx_kl" in flagged else "steady"
        value = "still learning" if "train/explained_variance" in flagged else "explains the returns"
        assert f"| {kl:.3g} {stability} | {ev:.3g} {value} |" in comparison


def test_success_indicators_are_checked_from_the_data(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = read_report(run["dir"])
    by_name = {i.name: i for i in data.indicators}
    assert by_name["no_crash"].status == "pass"
    assert by_name["no_crash"].facts == {"crashes": [], "failed": [], "oom": ["prompt_rl"], "oom_restarted": 1}
    assert by_name["checkpoints_saved"].status == "pass"
    for name, s in load_run(run["dir"]).experiments.items():
        assert Path(s.last_checkpoint).is_file()
        assert by_name["checkpoints_saved"].facts["checkpoints"][name] == {"step": s.checkpoint_step, "exists": True}
    assert by_name["tensorboard_written"].status == "pass"
    for name in EXPERIMENTS:
        scalars = 0
        for events_file in (run["dir"] / name).rglob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events_file))
            accumulator.Reload()
            scalars += sum(len(accumulator.Scalars(tag)) for tag in accumulator.Tags()["scalars"])
        assert scalars > 0 and by_name["tensorboard_written"].facts["records"][name] > 1
    trends = {name: reward_trend([v for _, v in exp.series[EPISODE_REWARD]])
              for name, exp in data.experiments.items() if EPISODE_REWARD in exp.series}
    assert by_name["reward_rising"].facts["trends"] == trends
    judged = [t for t in trends.values() if t]
    expected = "unknown" if not judged else ("pass" if all(t == "rising" for t in judged) else "fail")
    assert by_name["reward_rising"].status == expected
    assert by_name["gpu_steady"].status == "unknown" and by_name["gpu_steady"].facts["reason"] == "no_gpu"
    section = report_section(render_markdown(data, "en"), "Success indicators")
    assert "- ✓ No crash — passed: out-of-memory failures: 1, restarted: 1" in section


def test_files_tree_and_next_steps(run):
    data = read_report(run["dir"])
    markdown = render_markdown(data, "en")
    files = report_section(markdown, "Output files")
    for name in (RUN_FILE, "events.jsonl", "config.yaml", "prompt_rl/", "tensorboard/", "progress.csv",
                 "best_model.zip", "final_model.zip", "best_reward_net.pth", "finetuned_segmenter.pt"):
        assert re.search(rf"[├└]── {re.escape(name)}", files), name
    steps = report_section(markdown, "Next steps")
    assert (f"- Evaluate the finished experiments (`prompt_rl`, `postprocess_rl`, `reward_net`) on the held-out split "
            f"(val chose, test reports): `sa2va-tui evaluate {run['dir']}`") in steps
    assert "resume" not in steps  # nothing is left unfinished


def test_an_interrupted_run_says_so_and_how_to_continue(run, tmp_path):
    """A run whose supervisor died while reward_net was training."""
    copy = Path(shutil.copytree(run["dir"], tmp_path / run["dir"].name))
    state = json.loads((copy / RUN_FILE).read_text())
    state["experiments"]["reward_net"]["state"] = "running"
    state["active"] = True  # its supervisor never wrote that it ended
    state["supervisor_pid"] = _dead_pid()
    (copy / RUN_FILE).write_text(json.dumps(state))
    data = read_report(copy)
    assert not data.live and data.experiments["reward_net"].shown_state == "interrupted"
    markdown = render_markdown(data, "en")
    assert "| `reward_net` | interrupted |" in report_section(markdown, "Overview")
    assert "`reward_net`: left unfinished at step" in report_section(markdown, "Problems and how they were resolved")
    assert (f"- Continue the unfinished experiments (`reward_net`) from their last checkpoints: "
            f"`sa2va-tui resume {copy}`") in report_section(markdown, "Next steps")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- evaluation -------------------------------------------------------------------------

def test_every_message_exists_in_both_languages_with_the_same_placeholders():
    fields = string.Formatter()
    for key, (en, zh) in MESSAGES.items():
        assert en.strip() and zh.strip(), key
        assert {f for _, f, _, _ in fields.parse(en) if f} == {f for _, f, _, _ in fields.parse(zh) if f}, key


def test_the_chinese_report_has_no_english_sentence_left(run):
    zh = report_text(run, "zh")
    leaks = _english_words(zh) - PROPER_NOUNS
    assert not leaks, f"English words in the Chinese report: {sorted(leaks)}"
    for heading in ("概览", "GPU 使用情况", "预计完成时间", "实验对比", "问题及处理方式", "输出文件", "后续步骤", "成功指标",
                    "评估结果", "增益来自哪里", "初步结论", "组合策略", "学习曲线"):
        assert f"\n## {heading}\n" in zh
    assert not re.search(r"[\u4e00-\u9fff]", report_text(run, "en"))


def test_json_report_carries_the_facts_and_translated_sentences(run):
    assert run["json"].returncode == 0, run["json"].stderr
    report = json.loads((run["out"] / "report.json").read_text(encoding="utf-8"))
    states = load_run(run["dir"]).experiments
    assert report["lang"] == "zh" and report["run_id"] == run["dir"].name
    for name, s in states.items():
        got = report["experiments"][name]
        assert (got["state"], got["timesteps"], got["total"], got["batch_size"]) == (
            s.state, s.timesteps, s.total, s.batch_size)
        assert re.search(r"[\u4e00-\u9fff]", got["description"])
    (problem,) = report["problems"]
    assert problem["restart"]["changes"]["batch_size"] == [32, 16] and "显存不足" in problem["text"]
    assert {i["name"]: i["status"] for i in report["indicators"]}["no_crash"] == "pass"
    assert report["evaluation"]["split"] == "test" and report["evaluation"]["chosen_on"] == "val"
    assert report["conclusions"] and all(re.search(r"[\u4e00-\u9fff]", line) for line in report["conclusions"])
    assert report["combined_strategy"] and report["evaluation"]["breakdown"]["by"] == "condition"
    assert set(report["curves"]) == {"episode_reward", "ppo_metrics", "reward_net"}
    assert json.loads(render_json(read_report(run["dir"]), "en"))["experiments"].keys() == set(EXPERIMENTS)


def test_curves_are_png_images_next_to_the_report_and_referenced_from_it(run):
    from matplotlib.image import imread
    from PIL import Image

    report = run["out"] / "en" / "report.md"
    markdown = report_text(run, "en")
    assert run["reports"]["en"].stdout.count("curves: ") == 3
    for curve in ("episode_reward", "ppo_metrics", "reward_net"):
        path = curve_path(report, curve)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        height, width, _ = imread(path).shape
        assert width > 300 and height > 200
        assert f"]({path.name})" in markdown
