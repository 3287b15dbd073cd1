"""Stand-in experiments with the real contract (`run(ctx) -> dict`), only for what the
three real experiments cannot be made to show on a machine without a GPU:

- `probe`: placement on a GPU of a stand-in NVML (a real experiment given a GPU asks
  CUDA for it, and there is none here), and writes to every output a process has;
- `fail`: an arbitrary error at startup;
- `vanish`: a process that exits without a word, as a crash in native code would;
- `stuck`: a process that never reaches a step point (a real one does every few ms);
- `crash_once`: a crash after training started, on its first attempt only.

Registered by "module:function" (this folder is on the workers' sys.path, which spawn
copies from the parent), e.g. `entry_points={"prompt_rl": "sv_workload:probe"}`.
"""

from __future__ import annotations

import os
import sys
import time

from experiments.harness import WorkerContext

#: Step points `probe` passes through, so that pause and an injected OOM reach it.
PROBE_STEPS = 20


def probe(ctx: WorkerContext) -> dict:
    """Writes to every output a process has, passes through a few step points, and
    reports its environment. Loads no torch unless an injected OOM asks for it."""
    print("probe: print to stdout")
    print("probe: print to stderr", file=sys.stderr)
    os.write(1, b"probe: raw write to fd 1\n")
    os.write(2, b"probe: raw write to fd 2\n")
    torch_loaded_before_steps = "torch" in sys.modules
    for step in range(PROBE_STEPS):
        ctx.step_point(step)
        time.sleep(0.01)
        ctx.progress(step + 1, PROBE_STEPS)
    return {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "torch_loaded_before_entry": torch_loaded_before_steps,
        "batch_size": ctx.batch_size,
        "exp_dir": str(ctx.exp_dir),
    }


def fail(ctx: WorkerContext) -> dict:
    print("fail: about to go wrong")
    raise ValueError("the stand-in experiment failed on purpose")


def stuck(ctx: WorkerContext) -> dict:
    """Training, then never reaches another step point: only a hard kill ends it (a
    worker stopped before training ends by itself, with nothing to save)."""
    ctx.step_point(0)
    ctx.progress(1, PROBE_STEPS)  # in training now: what a test waits for before it stops it
    time.sleep(300)
    return {}


def vanish(ctx: WorkerContext) -> dict:
    """Exits without a word, as a crash in native code would."""
    print("vanish: leaving", flush=True)
    os._exit(7)


def crash_once(ctx: WorkerContext) -> dict:
    """Crashes after its first step on the first attempt (a marker in its folder says
    it already did), then trains to the end: what `recovery.retry_errors` is for."""
    marker = ctx.exp_dir / "crashed-once"
    ctx.step_point(0)
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError("a crash after training started")
    for step in range(1, PROBE_STEPS):
        ctx.step_point(step)
        ctx.progress(step + 1, PROBE_STEPS)
    return {"attempt_that_finished": 2}
