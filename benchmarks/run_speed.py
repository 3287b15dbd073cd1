"""A whole run of the default config, headless, from a cold mask cache in a temporary
folder (logs and cache both), then a warm second run, then quit in each phase.

Printed: wall time; the model work alone (distinct pairs x the fastest per-pair time
the mask stage measured in the same run, divided by its replicas) and the ratio of the
two; time to the first PPO update; model calls against distinct pairs; the warm run's
model calls; the seconds from quit (SIGINT, what Ctrl+C sends) to no worker left, per
phase; and which replica layout fills the cache faster on this CPU (N replicas of one
torch thread, or one replica of N threads). Also each run's CPU time, in all and per
worker: divided by the cores, it is the shortest wall time this code and config could
take with no core ever idle, so it bounds the ratio from below in the same run. Issue
15's targets: cold <= 180 s and <= 1.5 x the model work, first update <= 60 s, model
calls = distinct pairs cold and 0 warm, quit <= 2 s.

`python -m benchmarks run` runs it all (minutes); `SA2VA_BENCH_SET` adds `--set`
overrides (space-separated), for a shorter run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
#: Phases a quit is measured in (some worker has reached it).
QUIT_PHASES = ("loading_model", "caching_masks", "training")


def _launch(root: Path, cache: Path, extra: list[str]) -> subprocess.Popen:
    overrides = [f"run.logs_dir={root}", f"backend.cache_dir={cache}", *extra]
    command = [sys.executable, "-m", "sa2va_tui.cli", "launch", "--headless", "-c", str(DEFAULT_CONFIG)]
    for item in overrides:
        command += ["--set", item]
    # SIGINT as a terminal's Ctrl+C delivers it, even where this benchmark was started in
    # the background (a shell then leaves SIGINT ignored, and children inherit that).
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _run_dir(root: Path) -> Path | None:
    runs = [p for p in root.iterdir() if (p / "run.json").is_file()] if root.is_dir() else []
    return max(runs, default=None)


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


class WorkerCpu(threading.Thread):
    """CPU seconds (user + system) of each worker of the run under `root`, by name, read
    from /proc until stopped: a worker's last reading before it exits stands for it, so
    each figure is short by at most one interval of that worker's work."""

    INTERVAL_S = 0.2

    def __init__(self, root: Path) -> None:
        super().__init__(name="worker-cpu", daemon=True)
        self.root, self.seconds = root, {}
        self._stop_asked = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self._stop_asked.wait(self.INTERVAL_S):
            run_dir = _run_dir(self.root)
            for name, pid in _named_worker_pids(run_dir).items() if run_dir else ():
                fields = _stat(pid)
                if fields is not None:  # utime and stime, the 14th and 15th fields of stat
                    used = (int(fields[11]) + int(fields[12])) / self._tick
                    self.seconds[name] = max(self.seconds.get(name, 0.0), used)

    def stop(self) -> dict[str, float]:
        self._stop_asked.set()
        self.join()
        return dict(self.seconds)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def whole_run(root: Path, cache: Path, extra: list[str]) -> dict:
    """One headless run to its end: its figures from the run folder, and its CPU time (in
    all: every process the run started and reaped; and per worker)."""
    cpu_before = _children_cpu_s()
    sampler = WorkerCpu(root)
    sampler.start()
    began = time.time()
    process = _launch(root, cache, extra)
    process.wait()
    wall = time.time() - began
    cpu_by_worker = sampler.stop()
    run_dir = _run_dir(root)
    if process.returncode != 0 or run_dir is None:
        raise SystemExit(f"the run failed (exit {process.returncode}); see {run_dir or root}")
    state = json.loads((run_dir / "run.json").read_text())
    first_update = min((e["time"] for e in _events(run_dir) if e["type"] == "metrics"
                        and any(k.startswith("train/") for k in e.get("values", {}))), default=None)
    stage = (state.get("mask_stage") or {}).get("summary") or {}
    return {"wall_s": wall, "first_update_s": None if first_update is None else first_update - began,
            "model_calls": state.get("model_calls"), "distinct_pairs": state.get("distinct_pairs"),
            "cache_hits": state.get("cache_hits"), "fastest_s_per_pair": stage.get("fastest_s_per_pair"),
            "replicas": stage.get("replicas"), "run_dir": str(run_dir),
            "states": {n: s["state"] for n, s in state["experiments"].items()},
            "cpu_s": _children_cpu_s() - cpu_before, "cpu_s_by_worker": cpu_by_worker}


def _named_worker_pids(run_dir: Path) -> dict[str, int]:
    """Each worker's pid by name ("mask stage" for the stage), as run.json has them now."""
    try:
        state = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    found = {name: s.get("pid") for name, s in state.get("experiments", {}).items()}
    found["mask stage"] = (state.get("mask_stage") or {}).get("pid")
    return {name: pid for name, pid in found.items() if pid}


def _worker_pids(run_dir: Path) -> set[int]:
    return set(_named_worker_pids(run_dir).values())


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> set[int]:
    """Every live process whose parent is `pid` (the supervisor's workers)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                kids.add(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def quit_in(phase: str, root: Path, cache: Path, extra: list[str], timeout: float = 300.0) -> float | str:
    """Seconds from SIGINT to the supervisor to no worker left, once some worker of a
    fresh run has reached `phase`; or why there is no figure."""
    process = _launch(root, cache, extra)
    deadline = time.time() + timeout
    try:
        run_dir = None
        while time.time() < deadline:
            run_dir = _run_dir(root)
            if run_dir is not None and any(e["type"] == "phase" and e.get("phase") == phase
                                           for e in _events(run_dir)):
                break
            if process.poll() is not None:
                return f"the run ended (exit {process.returncode}) before any worker reached {phase}"
            time.sleep(0.05)
        else:
            return f"no worker reached {phase} within {timeout:.0f} s"
        workers = _children(process.pid) | _worker_pids(run_dir)
        asked = time.monotonic()
        process.send_signal(signal.SIGINT)
        while any(_alive(p) for p in workers) or process.poll() is None:
            if time.monotonic() - asked > 60:
                return "workers still alive 60 s after the quit"
            if process.poll() is None:
                workers |= _children(process.pid)
            time.sleep(0.01)
        return time.monotonic() - asked
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


LAYOUT_PROBE = r"""
import sys, tempfile, threading, time
import torch
from sa2va_contract.config import load_config
from experiments.backends import make_cached_segmenter, make_segmenter
from experiments.mask_needs import Splits, every_prompt
replicas, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
config = load_config(sys.argv[3], ["dataset.limit=24", f"backend.cache_dir={tempfile.mkdtemp()}"])
pairs = every_prompt(Splits(config)("train"), config.backend.prompts)
cache = make_cached_segmenter(config)
models = [make_segmenter(config) for _ in range(replicas)]
size = config.backend.batch_size
spans = [(i, min(len(pairs), i + size)) for i in range(0, len(pairs), size)]
lock = threading.Lock()
def work(model):
    while True:
        with lock:
            if not spans:
                return
            a, b = spans.pop(0)
        cache.fill(pairs.images[a:b], pairs.prompts[a:b], model)
began = time.perf_counter()
workers = [threading.Thread(target=work, args=(m,)) for m in models]
[t.start() for t in workers]
[t.join() for t in workers]
print((time.perf_counter() - began) / len(pairs))
"""


def layouts(cores: int) -> dict[str, float]:
    """Seconds per pair filling the cache: N replicas x 1 thread, 1 replica x N threads."""
    out = {}
    for label, replicas, threads in ((f"{cores} replicas x 1 thread", cores, 1),
                                     (f"1 replica x {cores} threads", 1, cores)):
        done = subprocess.run([sys.executable, "-c", LAYOUT_PROBE, str(replicas), str(threads), str(DEFAULT_CONFIG)],
                              cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        out[label] = float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else float("nan")
    return out


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    extra = os.environ.get("SA2VA_BENCH_SET", "").split()
    cores = len(os.sched_getaffinity(0))
    print(f"load average at start: {_load()} ({cores} cores)")
    for label, per_pair in layouts(cores).items():
        print(f"mask fill, {label}: {per_pair * 1000:.2f} ms per pair")
    with tempfile.TemporaryDirectory(prefix="sa2va-bench-run-") as tmp:
        tmp = Path(tmp)
        cold = whole_run(tmp / "cold", tmp / "cache", extra)
        pairs, fastest, replicas = cold["distinct_pairs"], cold["fastest_s_per_pair"], cold["replicas"] or 1
        work = pairs * fastest / replicas if pairs and fastest else None
        print(f"cold run: wall {cold['wall_s']:.1f} s (target <= 180 s); experiments {cold['states']}")
        if work:
            print(f"  model work alone: {pairs} pairs x {fastest * 1000:.2f} ms / {replicas} replicas = {work:.1f} s; "
                  f"wall / model work = {cold['wall_s'] / work:.2f} (target <= 1.5)")
        print("  " + cpu_line(cold, cores, work))
        first = cold["first_update_s"]
        print(f"  first PPO update {first:.1f} s after launch (target <= 60 s)" if first is not None
              else "  no PPO update recorded")
        print(f"  model calls {cold['model_calls']} vs distinct pairs {pairs} (target: equal); "
              f"cache hits {cold['cache_hits']}")
        print(f"load average after the cold run: {_load()}")
        warm = whole_run(tmp / "warm", tmp / "cache", extra)
        print(f"warm run: wall {warm['wall_s']:.1f} s; model calls {warm['model_calls']} (target 0); "
              f"cache hits {warm['cache_hits']}")
        print("  " + cpu_line(warm, cores, None))
        quits(tmp, extra, warm_cache=tmp / "cache")


def cpu_line(run: dict, cores: int, work: float | None) -> str:
    """The run's CPU time per worker and in all, and the wall time it implies with no
    core ever idle (and that floor's ratio to the model work)."""
    total, by_worker = run["cpu_s"], run["cpu_s_by_worker"]
    parts = ", ".join(f"{name} {seconds:.0f}" for name, seconds in sorted(by_worker.items()))
    rest = total - sum(by_worker.values())
    floor = total / cores
    line = (f"CPU time {total:.0f} s ({parts}, supervisor and the rest {rest:.0f}), {total / run['wall_s']:.2f} "
            f"of {cores} cores busy on average; with no core idle the run takes >= {floor:.1f} s")
    return line + (f", wall / model work >= {floor / work:.2f}" if work else "")


def quits(tmp: Path, extra: list[str], warm_cache: Path | None = None) -> None:
    """Quit in each phase: a fresh cache while loading and caching masks; for training a
    warm one (filled here first when not given)."""
    if warm_cache is None:
        warm_cache = tmp / "cache"
        # Only the masks matter: the shortest training that still reads them all.
        whole_run(tmp / "fill", warm_cache, [*extra, "prompt_rl.total_timesteps=64", "postprocess_rl.total_timesteps=64",
                                             "reward_net.reward.epochs=1", "reward_net.finetune.steps=2"])
    for phase in QUIT_PHASES:
        cache = tmp / f"cache-{phase}" if phase != "training" else warm_cache
        took = quit_in(phase, tmp / f"quit-{phase}", cache, extra)
        print(f"quit while {phase}: " + (f"{took:.2f} s to no worker left (target <= 2 s)"
                                          if isinstance(took, float) else took) + f"; load {_load()}")


def quit_main() -> None:
    """`python -m benchmarks quit`: only the quits, each in a fresh run (minutes)."""
    extra = os.environ.get("SA2VA_BENCH_SET", "").split()
    print(f"load average at start: {_load()}")
    with tempfile.TemporaryDirectory(prefix="sa2va-bench-quit-") as tmp:
        quits(Path(tmp), extra)
