"""What only a machine with an NVIDIA GPU can show, through the real supervisor:

1. a real CUDA out-of-memory error in a supervised worker (a workload that allocates GPU
   memory in proportion to its batch size asks for 4/3 of the GPU), and the supervisor
   restarting it by itself at half the batch, which then fits;
2. NVML's readings (what `sa2va-tui gpus` and the app show) next to `nvidia-smi`'s;
3. placement on the freest GPU: with two GPUs or more this script first fills GPU 0 from
   its own process, so the worker must land elsewhere;
4. the mask stage of a Sa2VA run on the GPUs: two replicas, each given room for 1/2.5 of
   the freest GPU's free memory (so both fit on it), dealt out as the launcher deals
   them (on the two freest GPUs, or both on one), each loaded onto its GPU by the number
   the stage's worker sees it under, and each pair computed once among them. The model
   is the suite's stand-in for Sa2VA's released code (tests/sa2va_standin.py, bf16,
   through the loader seam): no weights can be fetched on these machines, so this
   checks the stage's placement and device handling, not Sa2VA's kernels.

    .venv/bin/python scripts/gpu_check.py          # a minute or two; exit 0 when every check passed

Without an NVIDIA GPU (or with a CPU build of torch) it says so in one line and exits 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # workers are spawned with this sys.path, so `gpu_check:hog` imports there too

#: The workload's unit of memory: total / UNITS per batch element. The configured batch
#: of 16 asks for 16/12 of the GPU, the restart's 8 for 2/3 of it.
UNITS = 12
BATCH = 16
HOLD_STEPS = 40


def hog(ctx) -> dict:
    """The supervised workload: one block of batch_size units of GPU memory, held while
    the parent compares NVML with nvidia-smi."""
    import torch

    unit = torch.cuda.get_device_properties(0).total_memory // UNITS
    ctx.step_point(0)
    block = torch.empty(ctx.batch_size * unit, dtype=torch.uint8, device="cuda")  # the real OOM, at batch 16
    block.fill_(1)
    for step in range(1, HOLD_STEPS):
        ctx.step_point(step)
        ctx.progress(step + 1, HOLD_STEPS)
        time.sleep(0.25)
    return {"allocated_gib": round(block.numel() / 2**30, 2), "batch_size": ctx.batch_size,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class Events:
    """Every event of the run, and a wait for one."""

    def __init__(self) -> None:
        self.events: list = []
        self._cond = threading.Condition()

    def __call__(self, event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, match, timeout: float):
        with self._cond:
            self._cond.wait_for(lambda: any(match(e) for e in self.events), timeout)
            return next((e for e in self.events if match(e)), None)


class Report:
    def __init__(self) -> None:
        self.failures = 0
        self.checks = 0

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        self.failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what}", flush=True)


def nvidia_smi() -> tuple[dict[int, dict], dict[int, int]]:
    """Per GPU index: used/total MiB and utilisation; per pid: used MiB."""
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total,utilization.gpu",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout
    table = {}
    for line in gpus.strip().splitlines():
        index, used, total, util = (v.strip() for v in line.split(","))
        table[int(index)] = {"used": int(used), "total": int(total), "util": util}
    processes = {int(p.split(",")[0]): int(p.split(",")[1]) for p in apps.strip().splitlines() if p.strip()}
    return table, processes


def compare_with_nvidia_smi(report: Report, workers: dict[int, str], nvml, smi_reader) -> None:
    from sa2va_tui.gpus import read_gpus

    snapshot = read_gpus(nvml, workers=workers)
    smi, smi_processes = smi_reader()
    print("GPU  NVML used/total MiB   nvidia-smi used/total MiB   util NVML/smi")
    for gpu in snapshot.gpus:
        row = smi.get(gpu.index, {})
        used = None if gpu.memory_used is None else gpu.memory_used // 2**20
        total = None if gpu.memory_total is None else gpu.memory_total // 2**20
        print(f"{gpu.index:<4} {used}/{total:<16} {row.get('used')}/{row.get('total'):<22} {gpu.utilization}/{row.get('util')}")
        report.check(total == row.get("total"), f"GPU {gpu.index}: total memory NVML {total} MiB = nvidia-smi {row.get('total')}")
        if used is not None and "used" in row:
            report.check(abs(used - row["used"]) <= max(256, row["total"] // 100),
                         f"GPU {gpu.index}: used memory NVML {used} MiB ~ nvidia-smi {row['used']} MiB")
        for process in gpu.processes:
            mine = f" ({process.experiment})" if process.experiment else ""
            nvml_mib = None if process.used_memory is None else process.used_memory // 2**20
            print(f"     pid {process.pid}{mine}: NVML {nvml_mib} MiB, nvidia-smi {smi_processes.get(process.pid)} MiB")
    ours = [p for g in snapshot.gpus for p in g.processes if p.experiment]
    if not ours:
        print("     (NVML lists no process of ours: a container's PID namespace hides them; memory totals still compare)")


def occupy_gpu0(count: int):
    """With several GPUs, take half of GPU 0 from this process, so the freest is another."""
    if count < 2:
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    block = torch.empty(total // 2, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)
    time.sleep(2)  # NVML's view catches up
    return block


def main() -> int:
    from sa2va_tui.gpus import read_gpus

    snapshot = read_gpus()
    if not snapshot.available:
        print(f"gpu_check: needs an NVIDIA GPU, and this machine has none ({snapshot.message})", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: NVML sees {len(snapshot.gpus)} GPU(s) but torch {torch.__version__} has no CUDA "
              "(a CPU build): install a CUDA build of torch", file=sys.stderr)
        return 2
    return run_checks()


def check_stage_replicas(report: Report, nvml=None) -> None:
    """Check 4: a Sa2VA run's mask stage through the real supervisor, on the GPUs NVML
    shows (the real ones unless a test hands a stand-in)."""
    if str(ROOT / "tests") not in sys.path:  # the stand-in, for this process and the workers it spawns
        sys.path.insert(0, str(ROOT / "tests"))
    from sa2va_standin import write_checkpoint

    from experiments.backends.sa2va_families import LOADER_ENV
    from sa2va_contract.config import load_config
    from sa2va_tui.gpus import read_gpus
    from sa2va_tui.launching import mask_stage_gpus
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    logs = Path(tempfile.mkdtemp(prefix="gpu_check-stage-"))
    checkpoint = write_checkpoint(logs / "standin-checkpoint", "internvl3")
    gpus = read_gpus(nvml)
    free = max((g.memory_free or 0) for g in gpus.gpus)
    config = load_config(ROOT / "configs" / "quick.yaml", [
        f"run.logs_dir={logs}", "run.name=gpu-check-stage", "prompt_rl.enabled=false", "reward_net.enabled=false",
        "backend.kind=sa2va", f"backend.model_path={checkpoint}", f"backend.cache_dir={logs / 'cache'}",
        f"backend.replica_memory_gb={free / 2.5 / 2**30:.3f}", "backend.max_replicas=2", "backend.batch_size=1",
        "dataset.limit=6",
    ])
    expected, _ = mask_stage_gpus(config, gpus)
    store = RunStore.create(config)
    # Only the workers spawned now load through the seam (a test runs this in its own process).
    before = os.environ.get(LOADER_ENV)
    os.environ[LOADER_ENV] = "sa2va_standin:load_standin"
    supervisor = Supervisor(config, store, nvml=nvml)
    try:
        supervisor.start()
        ended = supervisor.wait(300)
    finally:
        supervisor.shutdown()
        if before is None:
            os.environ.pop(LOADER_ENV)
        else:
            os.environ[LOADER_ENV] = before
    state = json.loads((store.path / "run.json").read_text())
    stage = state.get("mask_stage") or {}
    summary = stage.get("summary") or {}
    states = {name: s["state"] for name, s in state["experiments"].items()}
    report.check(ended and stage.get("state") == "finished" and set(states.values()) == {"finished"},
                 f"a Sa2VA run with a mask stage finished: stage {stage.get('state')}, experiments {states}")
    report.check(summary.get("replicas") == len(expected) == 2,
                 f"the stage ran {summary.get('replicas')} replicas on {summary.get('devices')}, as NVML's free "
                 f"memory gives room for ({len(expected)}: GPUs {list(expected)})")
    report.check(state.get("distinct_pairs") and state.get("model_calls") == state.get("distinct_pairs"),
                 f"each pair computed once among them: {state.get('model_calls')} model calls for "
                 f"{state.get('distinct_pairs')} distinct pairs (run folder {store.path})")


def run_checks(nvml=None, entry: str = "gpu_check:hog", smi_reader=nvidia_smi, stage: bool = True) -> int:
    """The checks through the real supervisor (the fourth, the mask stage, where `stage`).
    `nvml`, `entry` and `smi_reader` are the real NVML, the GPU workload and nvidia-smi
    unless a test hands stand-ins."""
    from sa2va_contract.config import load_config
    from sa2va_contract.events import Change, Failed, Finished, Progress, Restarting, Started
    from sa2va_contract.gpus import choose_gpu
    from sa2va_tui.gpus import read_gpus
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    report = Report()
    snapshot = read_gpus(nvml)
    print(f"gpu_check: {snapshot.message}: " + ", ".join(f"{g.index} {g.name}" for g in snapshot.gpus))
    held = occupy_gpu0(len(snapshot.gpus))
    expected_gpu = choose_gpu(read_gpus(nvml))
    logs = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    config = load_config(ROOT / "configs" / "quick.yaml", [
        f"run.logs_dir={logs}", "run.name=gpu-check", "prompt_rl.enabled=false", "postprocess_rl.enabled=false",
        "reward_net.device=cuda", f"reward_net.finetune.batch_size={BATCH}",
        "recovery={max_oom_restarts: 2, min_batch_size: 1}",
    ])
    events = Events()
    supervisor = Supervisor(config, RunStore.create(config), entry_points={"reward_net": entry}, nvml=nvml)
    supervisor.subscribe(events)
    supervisor.start()
    try:
        first = events.wait_for(lambda e: isinstance(e, Started), 120)
        report.check(first is not None and first.gpu == expected_gpu,
                     f"placement: the worker started on GPU {getattr(first, 'gpu', None)}, the freest by NVML "
                     f"({expected_gpu}{'; GPU 0 half filled by this script' if held is not None else '; one GPU only'})")
        failed = events.wait_for(lambda e: isinstance(e, Failed), 120)
        report.check(failed is not None and failed.kind == "oom" and "out of memory" in failed.message.lower(),
                     f"a real CUDA OOM at batch {BATCH}: {getattr(failed, 'kind', None)}: "
                     f"{(getattr(failed, 'message', '') or '').splitlines()[0][:120]}")
        restart = events.wait_for(lambda e: isinstance(e, Restarting), 60)
        halved = restart is not None and restart.changes.batch_size == Change(BATCH, BATCH // 2)
        report.check(halved, "the supervisor restarted it at half the batch: "
                             f"{restart.changes.to_json() if restart is not None else None}")
        second = events.wait_for(lambda e: isinstance(e, Started) and e.attempt == 2, 120)
        holding = events.wait_for(lambda e: isinstance(e, Progress) and e.timesteps >= 8 and second is not None
                                  and events.events.index(e) > events.events.index(second), 120)
        if holding is not None and second is not None:
            compare_with_nvidia_smi(report, {second.pid: "reward_net"}, nvml, smi_reader)
        report.check(supervisor.wait(180), "the restarted worker finished")
        finished = events.wait_for(lambda e: isinstance(e, Finished), 5)
        report.check(finished is not None and finished.summary.get("batch_size") == BATCH // 2,
                     f"it held its memory at batch {BATCH // 2}: {getattr(finished, 'summary', None)}")
    finally:
        supervisor.shutdown()
    if stage:
        check_stage_replicas(report, nvml)
    print(f"gpu_check: {report.checks - report.failures} of {report.checks} checks passed (run folder {logs})")
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
