"""How fast the supervisor's control reaches a worker, and how fast workers notice a
dead supervisor (the issue's limits: pause within 1 s, no orphan after 10 s).

Workers run a stand-in experiment that steps every 10 ms, so the figures measure the
control path (pipes, threads, step points, process exit), not an experiment's step
length; a real experiment adds up to one of its steps, and its checkpoint's save time
to a stop. The last figure is the pause a user sees: the real prompt_rl of
configs/quick.yaml (as the issue that found a 1.1 s pause ran it), paused at random
moments of its training, so that a request may land in a PPO update, a checkpoint or an
evaluation, where no step point comes. (Not measured: a pause asked between the
"training" phase and the first step, while PPO builds its model and environments: no
step point comes there either.)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.harness import WorkerContext

STEP_S = 0.01
ENTRIES = {"prompt_rl": "benchmarks.supervisor_latency:stepper", "postprocess_rl": "benchmarks.supervisor_latency:stepper"}


def stepper(ctx: WorkerContext) -> dict:
    """Steps until stopped (StopRequested ends it); there is nothing to save. Loads
    torch as every real worker does: a process with torch loaded is slower to exit."""
    import torch  # noqa: F401

    step = 0
    while True:
        ctx.step_point(step)
        time.sleep(STEP_S)
        step += 1
        ctx.progress(step, 10**9)


def _config(root: Path, *extra: str):
    from sa2va_contract.config import load_config

    return load_config(None, [f"run.logs_dir={root}", "reward_net.enabled=false", "prompt_rl.device=cpu",
                              "postprocess_rl.device=cpu", *extra])


def _control_latencies(root: Path, repeats: int) -> dict[str, list[float]]:
    import threading

    from sa2va_contract.events import Paused, Resumed, Started
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    config = _config(root, "postprocess_rl.enabled=false")
    supervisor = Supervisor(config, RunStore.create(config), entry_points=ENTRIES)
    arrived: dict[type, threading.Event] = {Paused: threading.Event(), Resumed: threading.Event(),
                                            Started: threading.Event()}
    supervisor.subscribe(lambda e: type(e) in arrived and arrived[type(e)].set())
    supervisor.start()
    arrived[Started].wait(30)
    time.sleep(0.5)
    found: dict[str, list[float]] = {"pause": [], "resume": [], "stop": []}
    for _ in range(repeats):
        for action, event in (("pause", Paused), ("resume", Resumed)):
            arrived[event].clear()
            t0 = time.perf_counter()
            getattr(supervisor, action)("prompt_rl")
            arrived[event].wait(5)
            found[action].append(time.perf_counter() - t0)
            time.sleep(0.05)
    t0 = time.perf_counter()
    supervisor.stop("prompt_rl")
    supervisor.wait(30)
    found["stop"].append(time.perf_counter() - t0)
    supervisor.shutdown()
    return found


def _real_pause_latencies(root: Path, repeats: int, *overrides: str) -> list[float]:
    """Seconds from `pause` to the Paused event of the real prompt_rl (quick config,
    `overrides` applied), each request at a random moment of its training."""
    import random
    import threading

    from sa2va_contract.config import load_config
    from sa2va_contract.events import Paused, Progress, Resumed
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    repo = Path(__file__).resolve().parent.parent
    config = load_config(repo / "configs" / "quick.yaml", [
        f"run.logs_dir={root}", "postprocess_rl.enabled=false", "reward_net.enabled=false",
        "prompt_rl.total_timesteps=1000000000", *overrides])
    supervisor = Supervisor(config, RunStore.create(config))
    arrived = {Paused: threading.Event(), Resumed: threading.Event(), Progress: threading.Event()}
    supervisor.subscribe(lambda e: type(e) in arrived and (not isinstance(e, Progress) or e.timesteps > 0)
                         and arrived[type(e)].set())
    supervisor.start()
    found: list[float] = []
    try:
        arrived[Progress].wait(600)  # training has taken its first steps
        chance = random.Random(0)
        for _ in range(repeats):
            time.sleep(chance.uniform(0.2, 2.0))
            arrived[Paused].clear()
            t0 = time.perf_counter()
            supervisor.pause("prompt_rl")
            arrived[Paused].wait(30)
            found.append(time.perf_counter() - t0)
            arrived[Resumed].clear()
            supervisor.resume("prompt_rl")
            arrived[Resumed].wait(30)
    finally:
        supervisor.shutdown(0.0)
    return found


ORPHAN_SCRIPT = """
import json, sys, time
from sa2va_contract.config import load_config
from sa2va_tui.runstore import RunStore
from sa2va_tui.supervisor import Supervisor
from benchmarks.supervisor_latency import ENTRIES

if __name__ == "__main__":
    config = load_config(None, sys.argv[1:])
    supervisor = Supervisor(config, RunStore.create(config), entry_points=ENTRIES)
    supervisor.start()
    while not all(s.timesteps > 10 for s in supervisor.states().values()):
        time.sleep(0.05)
    supervisor.pause("postprocess_rl")
    time.sleep(0.3)
    print(json.dumps({n: s.pid for n, s in supervisor.states().items()}), flush=True)
    time.sleep(600)
"""


def _orphan_exit(root: Path) -> list[float]:
    """Seconds from SIGKILL of the supervisor to each worker's exit (one paused)."""
    from sa2va_tui.runstore import pid_alive

    args = [f"run.logs_dir={root}", "reward_net.enabled=false", "prompt_rl.device=cpu", "postprocess_rl.device=cpu"]
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, *args], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    pids = json.loads(proc.stdout.readline())
    proc.kill()
    killed = time.perf_counter()
    proc.wait()
    gone: dict[int, float] = {}
    while len(gone) < len(pids) and time.perf_counter() - killed < 30:
        for pid in pids.values():
            if pid not in gone and not pid_alive(pid):
                gone[pid] = time.perf_counter() - killed
        time.sleep(0.005)
    return sorted(gone.values())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        latencies = _control_latencies(Path(tmp) / "control", repeats=20)
        orphans = [_orphan_exit(Path(tmp) / f"orphan{i}") for i in range(3)]
        real_pauses = _real_pause_latencies(Path(tmp) / "real", repeats=20)
    print(f"{'measure':<42} {'median ms':>10} {'max ms':>10}")
    for action, values in latencies.items():
        ms = [v * 1000 for v in values]
        print(f"{action + ' request -> ' + {'stop': 'process exit'}.get(action, 'event'):<42} "
              f"{statistics.median(ms):>10.1f} {max(ms):>10.1f}")
    flat = [v * 1000 for run in orphans for v in run]
    print(f"{'supervisor SIGKILL -> worker exit (x6)':<42} {statistics.median(flat):>10.1f} {max(flat):>10.1f}")
    ms = [v * 1000 for v in real_pauses]
    print(f"{'pause -> event, real prompt_rl (x20)':<42} {statistics.median(ms):>10.1f} {max(ms):>10.1f}")


if __name__ == "__main__":
    main()
