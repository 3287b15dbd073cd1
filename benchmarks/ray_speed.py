"""What the ray backend costs against local processes: its start-up (a private Ray
instance on this machine, as `run.backend: ray` with `ray.address: local` starts one),
the time from launch to an attempt's first event, and the latency of events through
the app.

The latency is measured in the app itself: the Textual app runs on a pseudo-terminal
(as `benchmarks.ui_speed` runs it) over a real supervisor with three workers, each a
stand-in experiment that steps every 10 ms, reports progress at every step and a
metrics event every tenth. An event carries the wall-clock time the worker made it;
the figures are the time until the app's inbox (its subscriber) receives it, and until
a redraw shows that experiment's card at that step or later. Progress is coalesced on
the way (it supersedes itself), metrics are not.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.ui_speed import ROOT, Terminal
from experiments.harness import WorkerContext

NAMES = ("prompt_rl", "postprocess_rl", "reward_net")
TOTAL = 10**9
STEP_S = 0.01


def reporter(ctx: WorkerContext) -> dict:
    """Steps every 10 ms until stopped: progress every step, metrics every tenth."""
    step = 0
    while True:
        ctx.step_point(step)
        time.sleep(STEP_S)
        step += 1
        ctx.progress(step, TOTAL)
        if step % 10 == 0:
            ctx.metrics(step, {"rollout/ep_rew_mean": step / 1000})


def _config(root: Path, backend: str):
    from sa2va_contract.config import load_config

    overrides = [f"run.logs_dir={root}", f"run.backend={backend}", "ray.num_cpus=3"]
    overrides += [f"{name}.device=cpu" for name in NAMES]
    return load_config(None, overrides)


def startup(repeats: int) -> dict[str, list[float]]:
    """Seconds to start and to close the backend, in this process."""
    from sa2va_contract.config import RayConfig
    from sa2va_tui.placement.ray_backend import RayBackend

    found: dict[str, list[float]] = {"start": [], "close": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            backend = RayBackend(RayConfig(num_cpus=3), Path(tmp))
            found["start"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            backend.close()
            found["close"].append(time.perf_counter() - t0)
    return found


def first_events(backend: str, repeats: int) -> list[float]:
    """Seconds from `launch` to each attempt's Started (three at once, `repeats` times)."""
    from sa2va_contract.events import Started
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    found: list[float] = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            config = _config(Path(tmp), backend)
            supervisor = Supervisor(config, RunStore.create(config),
                                    entry_points={name: "benchmarks.ray_speed:reporter" for name in NAMES})
            started: list[float] = []
            supervisor.subscribe(lambda e: isinstance(e, Started) and started.append(time.perf_counter()))
            t0 = time.perf_counter()
            supervisor.start()
            deadline = time.monotonic() + 60
            while len(started) < len(NAMES) and time.monotonic() < deadline:
                time.sleep(0.01)
            found += [t - t0 for t in started]
            supervisor.shutdown(5.0)
    return found


# --- the app, in a child on a pseudo-terminal -------------------------------------------


class TimedInbox:
    """The app's own subscriber, with a look at each event as it arrives."""

    def __init__(self, inner, look) -> None:
        self._inner = inner
        self._look = look

    def __call__(self, event) -> None:
        self._look(event)
        self._inner(event)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def child(backend: str, seconds: float, out: Path) -> None:
    from sa2va_contract.events import Metrics, Progress
    from sa2va_tui.app import AppSource, Sa2vaApp
    from sa2va_tui.app.widgets import ExperimentCard
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    config = _config(out.parent / "logs", backend)
    supervisor = Supervisor(config, RunStore.create(config),
                            entry_points={name: "benchmarks.ray_speed:reporter" for name in NAMES})
    app = Sa2vaApp(AppSource.of_supervisor(supervisor))
    measuring = threading.Event()
    inbox: dict[str, list[float]] = {"progress": [], "metrics": []}
    made: list[tuple[float, str, int]] = []  # (made at, experiment, step) of every Progress
    shown: list[tuple[float, dict[str, int]]] = []  # (redraw at, card steps)

    def arrived(event) -> None:
        if measuring.is_set() and isinstance(event, (Progress, Metrics)):
            inbox[event.type].append(time.time() - event.time)
            if isinstance(event, Progress):
                made.append((event.time, event.experiment, event.timesteps))

    app.dashboard.inbox = TimedInbox(app.dashboard.inbox, arrived)  # type: ignore[assignment]
    original = app.dashboard.redraw

    def timed_redraw() -> None:
        original()
        if measuring.is_set():
            cards = {card.experiment: card.view for card in app.dashboard.query(ExperimentCard)}
            shown.append((time.time(), {name: int(re.match(r"[\d,]+", view.progress).group().replace(",", ""))
                                        for name, view in cards.items() if view is not None}))

    app.dashboard.redraw = timed_redraw  # type: ignore[method-assign]
    result: dict = {}

    def measure() -> None:
        deadline = time.monotonic() + 90
        while not all(s.timesteps for s in supervisor.states().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        measuring.set()
        time.sleep(seconds)
        measuring.clear()
        screen = []
        for when, name, step in made:
            seen = next((at for at, steps in shown if at >= when and steps.get(name, -1) >= step), None)
            if seen is not None:
                screen.append(seen - when)
        result.update(inbox, screen=screen, started=len(supervisor.states()))
        app.call_from_thread(app.exit)

    threading.Thread(target=measure, daemon=True).start()
    app.run()
    supervisor.shutdown(5.0)
    out.write_text(json.dumps(result))


def through_the_app(backend: str, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        terminal = Terminal([sys.executable, "-m", "benchmarks.ray_speed", "--child", backend, "--seconds",
                             str(seconds), "--out", str(out)], env={"OMP_NUM_THREADS": "1"}, cwd=ROOT)
        terminal.wait(seconds + 150)
        return json.loads(out.read_text()) if out.exists() else {}


def _ms(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8}"
    ordered = sorted(v * 1000 for v in values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(ordered):>8.1f} {p90:>8.1f} {ordered[-1]:>8.1f}"


def main() -> None:
    print("starting and closing a private Ray instance (x3) ...", flush=True)
    costs = startup(3)
    print("launch -> first event, three attempts at once (x2 per backend) ...", flush=True)
    first = {backend: first_events(backend, 2) for backend in ("local", "ray")}
    print("event latency through the app (8 s per backend) ...", flush=True)
    app = {backend: through_the_app(backend, 8.0) for backend in ("local", "ray")}
    print()
    print(f"{'measure':<52} {'median':>8} {'p90':>8} {'max':>8}  (ms)")
    print(f"{'ray backend start (ray.init, private, 3 CPUs)':<52} {_ms(costs['start'])}")
    print(f"{'ray backend close (ray.shutdown, logs kept)':<52} {_ms(costs['close'])}")
    for backend in ("local", "ray"):
        print(f"{f'{backend}: launch -> Started (x{len(first[backend])})':<52} {_ms(first[backend])}")
    for backend in ("local", "ray"):
        r = app[backend]
        if not r:
            print(f"{backend}: the app run gave no result")
            continue
        for kind, label in (("metrics", "metrics event -> app inbox"), ("progress", "progress event -> app inbox"),
                            ("screen", "progress event -> on screen")):
            print(f"{f'{backend}: {label} (n={len(r[kind])})':<52} {_ms(r[kind])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("local", "ray"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds, args.out)
    else:
        main()
