"""The GPU reader: values, N/A on any failing call, the no-GPU state, placement, sampler."""

from __future__ import annotations

import inspect
import threading
from collections import Counter

import pynvml
import pytest
from rich.console import Console

from fake_nvml import GiB, FakeGpu, FakeNvml
from sa2va_contract.gpus import GpuInfo, GpuSnapshot, choose_gpu
from sa2va_tui.gpus import GpuSampler, Nvml, read_gpus


def two_gpus() -> FakeNvml:
    return FakeNvml([
        FakeGpu(name="NVIDIA A100-SXM4-80GB", used=30 * GiB, utilization=90, processes={111: 20 * GiB, 999: 9 * GiB}),
        FakeGpu(name="NVIDIA A100-SXM4-80GB", used=2 * GiB, utilization=5, processes={222: None}),
    ])


def test_the_stand_in_keeps_the_real_api():
    fake = two_gpus()
    for name, member in inspect.getmembers(FakeNvml, inspect.isfunction):
        if name.startswith("nvml"):
            real = getattr(pynvml, name)
            assert list(inspect.signature(member).parameters)[1:] == list(inspect.signature(real).parameters), name
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(fake.nvmlDeviceGetMemoryInfo(handle), pynvml.c_nvmlMemory_t)
    assert isinstance(fake.nvmlDeviceGetUtilizationRates(handle), pynvml.c_nvmlUtilization_t)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(5)


def test_reads_every_gpu_and_names_our_workers():
    snapshot = read_gpus(two_gpus(), workers={111: "prompt_rl", 222: "reward_net"})
    assert snapshot.available and snapshot.message == "2 NVIDIA GPUs"
    first, second = snapshot.gpus
    assert (first.index, first.name, first.utilization) == (0, "NVIDIA A100-SXM4-80GB", 90)
    assert (first.memory_used, first.memory_total, first.memory_free) == (30 * GiB, 80 * GiB, 50 * GiB)
    assert {(p.pid, p.used_memory, p.experiment) for p in first.processes} == {
        (111, 20 * GiB, "prompt_rl"), (999, 9 * GiB, None)}
    assert [(p.pid, p.used_memory, p.experiment) for p in second.processes] == [(222, None, "reward_net")]


def test_each_failing_call_is_na_and_the_rest_still_reads():
    fake = two_gpus()
    fake.gpus[0].failing = {
        "nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetName": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        "nvmlDeviceGetComputeRunningProcesses": pynvml.NVML_ERROR_NO_PERMISSION,
    }
    fake.gpus[1].failing = {"nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_GPU_IS_LOST}
    first, second = read_gpus(fake).gpus
    assert (first.name, first.utilization, first.processes) == (None, None, [])
    assert first.memory_free == 50 * GiB
    assert (second.memory_used, second.memory_total, second.memory_free) == (None, None, None)
    assert second.utilization == 5 and second.name


def test_a_gpu_whose_handle_fails_is_listed_with_nothing_known():
    fake = two_gpus()
    fake.gpus[1].failing = {"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_GPU_IS_LOST}
    snapshot = read_gpus(fake)
    assert snapshot.available and snapshot.gpus[1] == GpuInfo(index=1)


@pytest.mark.parametrize(("code", "words"), [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "library was not found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
    (pynvml.NVML_ERROR_UNKNOWN, "NVML failed to start (Unknown Error)"),
])
def test_no_driver_is_one_clear_state(code, words):
    fake = FakeNvml([FakeGpu()], init_error=code)
    nvml = Nvml(fake)
    for _ in range(3):
        snapshot = nvml.read()
        assert not snapshot.available and snapshot.gpus == []
        assert snapshot.message.startswith("no NVIDIA GPU") and words in snapshot.message
    # Asked once: a driver does not appear while we run.
    assert fake.calls == ["nvmlInit"]


def test_a_driver_with_no_gpu_and_a_failing_count():
    assert read_gpus(FakeNvml([])).message == "no NVIDIA GPU: the driver reports none"
    failing = FakeNvml([FakeGpu()], failing={"nvmlDeviceGetCount": pynvml.NVML_ERROR_UNKNOWN})
    assert not read_gpus(failing).available


def test_the_real_library_on_this_machine_never_raises():
    snapshot = read_gpus()
    assert snapshot.available or snapshot.message.startswith("no NVIDIA GPU")


def test_nvml_is_started_once_and_shut_down():
    fake = two_gpus()
    nvml = Nvml(fake)
    nvml.read()
    nvml.read()
    nvml.shutdown()
    assert fake.calls.count("nvmlInit") == 1 and fake.init_count == 0


def _gpu(index, free_gib, util, total_gib=80):
    return GpuInfo(index=index, utilization=util, memory_used=(total_gib - free_gib) * GiB if free_gib is not None
                   else None, memory_total=total_gib * GiB if free_gib is not None else None)


def test_placement():
    snap = GpuSnapshot(True, gpus=[_gpu(0, 10, 0), _gpu(1, 60, 50), _gpu(2, 60, 10), _gpu(3, None, 0)])
    assert choose_gpu(snap) == 2  # most free memory, then lowest utilisation
    assert choose_gpu(snap, pinned=0) == 0
    assert choose_gpu(GpuSnapshot(True, gpus=[_gpu(0, None, 0), _gpu(1, 1, 99)])) == 1  # N/A memory last
    assert choose_gpu(GpuSnapshot(False, "no NVIDIA GPU")) is None
    assert choose_gpu(GpuSnapshot(False, "no NVIDIA GPU"), pinned=1) is None  # the CPU, pinned or not
    # Workers just placed, not yet visible to NVML, spread a launch over the GPUs.
    assert choose_gpu(snap, placed=Counter({2: 1})) == 1
    assert choose_gpu(snap, placed=Counter({1: 1, 2: 1})) == 0  # known free memory first


def test_sampler_reads_once_a_period_until_stopped():
    got: list[GpuSnapshot] = []
    three = threading.Event()

    def collect(snapshot):
        got.append(snapshot)
        if len(got) == 3:
            three.set()

    sampler = GpuSampler(Nvml(two_gpus()).read, lambda: {111: "prompt_rl"}, collect, interval=0.02)
    sampler.start()
    assert three.wait(10)
    sampler.stop()
    sampler.join(5)
    assert not sampler.is_alive()
    assert got[0].gpus[0].processes[0].experiment == "prompt_rl"


def test_sampler_without_gpu_reports_once_and_ends():
    got = []
    sampler = GpuSampler(Nvml(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)).read, dict, got.append, 0.01)
    sampler.start()
    sampler.join(5)
    assert not sampler.is_alive() and len(got) == 1 and not got[0].available


def test_gpu_table_shows_na_and_our_experiments():
    from sa2va_tui.commands.run_cmds import gpu_table

    fake = two_gpus()
    fake.gpus[1].failing = {"nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_NOT_SUPPORTED}
    console = Console(record=True, width=120)
    console.print(gpu_table(read_gpus(fake, workers={111: "prompt_rl"})))
    text = console.export_text()
    assert "prompt_rl (20.0 GiB), pid 999 (9.0 GiB)" in text and "pid 222 (N/A)" in text
    assert "90%" in text and "30.0 / 80.0" in text and "N/A" in text.splitlines()[2]


def test_gpus_command_without_a_driver(cli):
    result = cli("gpus")
    assert result.returncode == 0, result.stderr
    snapshot = read_gpus()
    if not snapshot.available:
        assert result.stdout.strip() == snapshot.message
