"""scripts/gpu_check.py needs an NVIDIA GPU, which this machine does not have: it must say
so in one line. Its orchestration (the real supervisor, the OOM restart at half the
batch, the comparison with nvidia-smi, the placement check) is run here with what a GPU
would give stood in for: NVML (tests/fake_nvml.py), nvidia-smi's numbers, and a workload
that raises torch's own OutOfMemoryError where the GPU would run out; the mask stage's
check with its Sa2VA stand-in's replicas on the CPU."""

import importlib.util
import os
import subprocess
import sys
import time

import torch

from conftest import ROOT
from experiments.backends.sa2va_families import LOADER_ENV
from fake_nvml import FakeGpu, FakeNvml, GiB

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_hog(ctx) -> dict:
    """The script's workload with a 12 GiB budget instead of a GPU: batch 16 of 1 GiB
    units does not fit, batch 8 does."""
    if ctx.batch_size > 12:
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {ctx.batch_size}.00 GiB")
    for step in range(12):
        ctx.step_point(step)
        ctx.progress(step + 1, 12)
        time.sleep(0.05)
    return {"batch_size": ctx.batch_size}


def test_without_a_gpu_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: needs an NVIDIA GPU, and this machine has none (no NVIDIA GPU: the NVIDIA driver's NVML library "
        "was not found)"]


def test_the_checks_pass_where_the_gpu_behaves(capsys):
    script = load_script()
    nvml = FakeNvml([FakeGpu(total=12 * GiB, used=1 * GiB)])

    def smi():
        return {0: {"used": 1024, "total": 12 * 1024, "util": "0"}}, {}

    assert script.run_checks(nvml=nvml, entry="test_sa2va_gpu_check:cpu_hog", smi_reader=smi) == 0
    out = capsys.readouterr().out
    assert "ok    placement: the worker started on GPU 0, the freest by NVML (0; one GPU only)" in out
    assert "ok    a real CUDA OOM at batch 16: oom: OutOfMemoryError: CUDA out of memory. Tried to allocate 16.00 GiB" in out
    assert "ok    the supervisor restarted it at half the batch: " in out and "'batch_size': [16, 8]" in out
    assert "ok    it held its memory at batch 8" in out
    assert "ok    GPU 0: used memory NVML 1024 MiB ~ nvidia-smi 1024 MiB" in out
    # The stage check, its Sa2VA stand-in on the CPU here: 11 GiB free holds two replicas.
    assert "ok    a Sa2VA run with a mask stage finished: stage finished, experiments {'postprocess_rl': 'finished'}" in out
    assert "ok    the stage ran 2 replicas on ['gpu 0 ×2'], as NVML's free memory gives room for (2: GPUs [0, 0])" in out
    assert "ok    each pair computed once among them: 12 model calls for 12 distinct pairs" in out
    assert "FAIL" not in out and "10 of 10 checks passed" in out


def test_a_disagreeing_nvidia_smi_fails_the_check(capsys):
    script = load_script()
    nvml = FakeNvml([FakeGpu(total=12 * GiB, used=1 * GiB)])

    def smi():
        return {0: {"used": 9000, "total": 12 * 1024, "util": "0"}}, {}

    assert script.run_checks(nvml=nvml, entry="test_sa2va_gpu_check:cpu_hog", smi_reader=smi, stage=False) == 1
    assert "FAIL  GPU 0: used memory NVML 1024 MiB ~ nvidia-smi 9000 MiB" in capsys.readouterr().out


def test_the_stage_check_spreads_its_replicas_over_two_gpus(capsys):
    script = load_script()
    report = script.Report()
    nvml = FakeNvml([FakeGpu(total=12 * GiB, used=6 * GiB), FakeGpu(total=12 * GiB, used=1 * GiB)])
    script.check_stage_replicas(report, nvml)
    out = capsys.readouterr().out
    assert "ok    the stage ran 2 replicas on ['gpu 1', 'gpu 0'], as NVML's free memory gives room for (2: GPUs [1, 0])" in out
    assert report.checks == 3 and report.failures == 0, out
    assert LOADER_ENV not in os.environ  # only the check's workers loaded through the seam
