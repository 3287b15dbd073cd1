"""How light and quick the Textual app is (the issue's limits: keeps up with 5,000 metric
events a second, under 5% of a core with three experiments running, first frame within
2 s of the command, under 200 MB).

Every figure comes from a real terminal: the app runs in a child process on a
pseudo-terminal of 160x48 whose output this process drains, as a terminal would.
Scenarios:

- flood: a synthetic source delivers Progress and Metrics events for three experiments
  at 5,000 a second (and as fast as it can) on its own thread, like the supervisor's
  drain thread; the app must not fall behind (its message queue stays short, the last
  value is on screen within a redraw) and its own CPU is the process's minus the source's.
- steady: the same source at the pace of three real experiments (progress ten times a
  second, metrics twice, a GPU sample once).
- supervised: a real Supervisor with three real worker processes (a stepper that reports
  like a PPO run: progress every 10 ms step, SB3 metrics twice a second); the process's
  CPU then includes the supervisor's own threads.
- first frame: the `sa2va-tui watch` and `sa2va-tui launch` commands themselves, from
  the exec to the first frame on the terminal.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import resource
import select
import signal
import struct
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

from experiments.harness import WorkerContext
from sa2va_contract.events import Event, GpuSample, Metrics, Progress
from sa2va_tui.runstate import EventHub

COLUMNS, ROWS = 160, 48
NAMES = ("prompt_rl", "postprocess_rl", "reward_net")
#: The title's first characters: their arrival on the terminal is the first frame.
TITLE = b"sa2va-tui"
BATCH_S = 0.01
TOTAL = 10**9
ROOT = Path(__file__).resolve().parent.parent


# --- sources ---------------------------------------------------------------------------


def ppo_values(step: int) -> dict[str, float]:
    """The keys an SB3 PPO logger writes, with values that move."""
    return {"rollout/ep_rew_mean": 0.3 + 0.01 * (step % 97), "rollout/ep_len_mean": 2.5,
            "train/approx_kl": 0.01 + 0.0001 * (step % 50), "train/clip_fraction": 0.1, "train/entropy_loss": -2.3,
            "train/explained_variance": 0.2, "train/value_loss": 0.01, "time/fps": 120.0, "time/iterations": step}


class SyntheticHub(EventHub):
    """Progress and Metrics events for three experiments, `rate` a second in 10 ms
    batches (every fourth a Metrics), folded and delivered on one thread as the
    supervisor's drain thread does; `rate` 0 means as fast as it can."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.produced = 0
        self.last_timesteps: dict[str, int] = {}
        #: The source thread's id, for its CPU time in /proc.
        self.native_id: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthetic-source", daemon=True)
        with self._lock:
            for name in NAMES:
                self._book.add(name)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        step, credit, next_at, next_gpu = 0, 0.0, time.perf_counter(), 0.0
        while not self._stopped.is_set():
            credit += self.rate * BATCH_S if self.rate else 200
            count, credit = int(credit), credit - int(credit)
            batch: list[Event] = []
            for i in range(count):
                name = NAMES[i % len(NAMES)]
                step += 1
                batch.append(Metrics(name, step=step, values=ppo_values(step)) if step % 4 == 0
                             else Progress(name, timesteps=step, total=TOTAL))
            if time.monotonic() >= next_gpu:
                next_gpu = time.monotonic() + 1.0
                batch.append(GpuSample("", available=False, message="no NVIDIA GPU: synthetic"))
            with self._lock:
                for event in batch:
                    self._book.apply(event)
                    if isinstance(event, Progress):
                        self.last_timesteps[event.experiment] = event.timesteps
            self._deliver(batch)
            self.produced += len(batch)
            if self.rate:
                next_at += BATCH_S
                self._stopped.wait(max(0.0, next_at - time.perf_counter()))

    @property
    def done(self) -> bool:
        return False

    def shutdown(self, grace_s: float = 0.0) -> None:
        del grace_s
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


def ppo_like(ctx: WorkerContext) -> dict:
    """A worker that reports like a PPO run on a fast machine: a 10 ms step with a
    progress report each, SB3's metrics every 50 steps; until stopped."""
    step = 0
    while True:
        ctx.step_point(step)
        time.sleep(0.01)
        step += 1
        ctx.progress(step, TOTAL)
        if step % 50 == 0:
            ctx.metrics(step, ppo_values(step))


# --- the child: the app on a pseudo-terminal -------------------------------------------


def _thread_cpu(tid: int) -> float:
    """CPU seconds of one thread of this process, from /proc."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(scenario: str, rate: float, seconds: float, out: Path) -> None:
    """Run the app over the scenario's source for `seconds` after a 1 s warm-up, then
    write what was measured to `out` and exit."""
    from sa2va_tui.app import AppSource, Sa2vaApp
    from sa2va_tui.app.widgets import ExperimentCard

    supervisor = None
    if scenario == "supervised":
        from sa2va_contract.config import load_config
        from sa2va_tui.runstore import RunStore
        from sa2va_tui.supervisor import Supervisor

        config = load_config(ROOT / "configs" / "quick.yaml", [f"run.logs_dir={out.parent / 'logs'}"])
        entries = {kind: "benchmarks.ui_speed:ppo_like" for kind in NAMES}
        supervisor = Supervisor(config, RunStore.create(config), entry_points=entries)
        source = AppSource.of_supervisor(supervisor)
        hub: EventHub = supervisor
    else:
        hub = SyntheticHub(rate)
        source = AppSource(hub=hub, title=f"synthetic {scenario}", log_path=lambda name: None, start=hub.start)
    app = Sa2vaApp(source)
    main_tid = threading.get_native_id()
    redraws: list[float] = []
    original = app.dashboard.redraw

    def timed_redraw() -> None:
        start = time.perf_counter()
        original()
        redraws.append(time.perf_counter() - start)

    app.dashboard.redraw = timed_redraw  # type: ignore[method-assign]
    result: dict = {}

    def measure() -> None:
        time.sleep(1.0)  # the first frame and the workers' start are not the steady state
        if supervisor is not None:
            deadline = time.monotonic() + 60
            while not all(s.timesteps for s in supervisor.states().values()) and time.monotonic() < deadline:
                time.sleep(0.2)
        synthetic = hub if isinstance(hub, SyntheticHub) else None
        source0 = _thread_cpu(synthetic.native_id) if synthetic else 0.0
        cpu0, main0, wall0, n0 = _process_cpu(), _thread_cpu(main_tid), time.perf_counter(), len(redraws)
        produced0 = synthetic.produced if synthetic else 0
        queue_max = 0
        while time.perf_counter() - wall0 < seconds:
            queue_max = max(queue_max, app.dashboard._message_queue.qsize(), app._message_queue.qsize())
            time.sleep(0.05)
        wall = time.perf_counter() - wall0
        cpu, main_cpu = _process_cpu() - cpu0, _thread_cpu(main_tid) - main0
        result.update(wall_s=wall, process_cpu=cpu / wall, main_thread_cpu=main_cpu / wall, queue_max=queue_max,
                      redraws_per_s=(len(redraws) - n0) / wall, redraw_ms_mean=1000 * _mean(redraws[n0:]),
                      redraw_ms_max=1000 * max(redraws[n0:], default=0.0))
        if synthetic is not None:
            source_cpu = _thread_cpu(synthetic.native_id) - source0
            produced = synthetic.produced - produced0
            synthetic.shutdown()
            result.update(events_per_s=produced / wall, source_cpu=source_cpu / wall,
                          delivered_all=app.dashboard.inbox.received == synthetic.produced,
                          process_cpu_minus_source=(cpu - source_cpu) / wall,
                          catch_up_s=_catch_up(synthetic, app, ExperimentCard))
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        app.call_from_thread(app.exit)

    threading.Thread(target=measure, daemon=True).start()
    app.run()
    hub.shutdown(5.0)
    out.write_text(json.dumps(result))


def _catch_up(hub: SyntheticHub, app, card_type: type) -> float:
    """Seconds from the source's last event to the screen showing its last count."""
    stopped = time.perf_counter()
    wanted = {name: f"{steps:,}" for name, steps in hub.last_timesteps.items()}
    cards = {card.experiment: card for card in app.dashboard.query(card_type)}
    while time.perf_counter() - stopped < 5.0:
        if all(cards[name].view and cards[name].view.progress.startswith(text) for name, text in wanted.items()):
            return time.perf_counter() - stopped
        time.sleep(0.01)
    return float("inf")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# --- the parent: a terminal that records what arrives ----------------------------------


class Terminal:
    """A command on a pseudo-terminal of COLUMNS x ROWS, its output drained on a thread."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.started = time.perf_counter()
        self.first_frame: float | None = None
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a terminal of the right size, then the command
            os.chdir(cwd)
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
            os.execve(argv[0], argv, {**os.environ, "TERM": "xterm-256color", **(env or {})})
        self._tail = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.5)
                data = os.read(self.fd, 65536) if ready else b""
            except OSError:
                return  # the child closed the terminal
            if ready and not data:
                return
            if self.first_frame is None and TITLE in self._tail + data:
                self.first_frame = time.perf_counter() - self.started
            self._tail = (self._tail + data)[-len(TITLE):]

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        return None


def run_child(scenario: str, rate: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        terminal = Terminal([sys.executable, "-m", "benchmarks.ui_speed", "--child", scenario, "--rate", str(rate),
                             "--seconds", str(seconds), "--out", str(out)], env={"OMP_NUM_THREADS": "1"})
        terminal.wait(seconds + 90)
        result = json.loads(out.read_text()) if out.exists() else {"error": "no result"}
        result["first_frame_s"] = terminal.first_frame
        return result


def first_frame_of(argv: list[str]) -> tuple[float | None, int | None]:
    """Seconds from exec to the first frame of a `sa2va-tui` command; then q, y to quit."""
    terminal = Terminal([sys.executable, "-m", "sa2va_tui.cli", *argv], env={"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 30
    while terminal.first_frame is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    terminal.type("q")
    time.sleep(0.5)
    terminal.type("y")
    return terminal.first_frame, terminal.wait(60)


SB3_TABLE = """-----------------------------------------
| rollout/                |             |
|    ep_len_mean          | 2.4         |
|    ep_rew_mean          | {reward:.3f}       |
| time/                   |             |
|    fps                  | 812         |
|    iterations           | {it}           |
|    total_timesteps      | {steps}        |
| train/                  |             |
|    approx_kl            | 0.0123      |
|    explained_variance   | 0.05        |
-----------------------------------------
"""


def main() -> None:
    rows: list[tuple[str, dict]] = []
    for scenario, rate, label in (("flood", 5000, "flood 5,000/s"), ("flood", 0, "flood, as fast as it can"),
                                  ("steady", 40, "steady, 3 experiments"),
                                  ("supervised", 0, "real supervisor, 3 workers")):
        print(f"running: {label} ...", flush=True)
        rows.append((label, run_child(scenario, rate, seconds=8.0)))
    print()
    print(f"{'scenario':<28} {'events/s':>9} {'all seen':>8} {'queue':>5} {'catch-up':>8} {'redraw/s':>8} "
          f"{'redraw ms':>9} {'UI CPU':>7} {'process':>7} {'main thr':>8} {'1st frame':>9} {'RSS MB':>6}")
    for label, r in rows:
        if "error" in r:
            print(f"{label:<28} {r['error']}")
            continue
        ui = r.get("process_cpu_minus_source", r["process_cpu"])
        events = f"{r['events_per_s']:,.0f}" if "events_per_s" in r else "-"
        catch = f"{r['catch_up_s']:.2f} s" if "catch_up_s" in r else "-"
        seen = {True: "yes", False: "NO"}.get(r.get("delivered_all"), "-")
        first = f"{r['first_frame_s']:.2f} s" if r.get("first_frame_s") else "-"
        print(f"{label:<28} {events:>9} {seen:>8} {r['queue_max']:>5} {catch:>8} {r['redraws_per_s']:>8.1f} "
              f"{r['redraw_ms_mean']:>6.1f}/{r['redraw_ms_max']:<3.0f}{ui:>7.1%} {r['process_cpu']:>7.1%} "
              f"{r['main_thread_cpu']:>8.1%} {first:>9} {r['max_rss_mb']:>6.0f}")
    print("UI CPU: the app's process less the synthetic source's thread (for the real supervisor: the whole "
          "process, supervisor threads included), in share of one core; queue: most messages waiting at once.")

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "train.log"
        log.write_text("".join(SB3_TABLE.format(reward=0.1 * i, it=i, steps=2048 * i) for i in range(1, 40)))
        print()
        for label, argv in (
            ("sa2va-tui watch LOG", ["watch", str(log), "--no-follow", "--total", "100000"]),
            ("sa2va-tui launch --only prompt_rl", ["launch", "--only", "prompt_rl", "-c", "configs/quick.yaml",
                                                   "--set", f"run.logs_dir={tmp}/logs"]),
        ):
            seconds, code = first_frame_of(argv)
            shown = f"{seconds:.2f} s" if seconds is not None else "never"
            print(f"first frame of `{label}`: {shown} (exit code after q, y: {code})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("flood", "steady", "supervised"))
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rate, args.seconds, args.out)
    else:
        main()
