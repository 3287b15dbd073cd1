"""The GPUs as NVML sees them, read so that nothing about them can crash the tool.

In the spirit of nvitop's libnvml: every NVML call that fails (not supported, lost GPU,
no permission, a function the driver lacks) becomes N/A (`None`) for that one value;
no driver or no library at all becomes one clear "no NVIDIA GPU" state, and the tool
runs on the CPU. The NVML module is a parameter (`pynvml` by default), so tests hand in
a stand-in with the same API instead of patching the real library.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable

from sa2va_contract.events import GpuSample
from sa2va_contract.gpus import GpuInfo, GpuProcess, GpuSnapshot

#: Why NVML could not start, by error code name, in words for the researcher.
_INIT_FAILURES = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": "no NVIDIA GPU: the NVIDIA driver's NVML library was not found",
    "NVML_ERROR_DRIVER_NOT_LOADED": "no NVIDIA GPU: the NVIDIA driver is not loaded",
    "NVML_ERROR_NO_PERMISSION": "no NVIDIA GPU: no permission to query the NVIDIA driver",
}


class Nvml:
    """One process's connection to NVML, initialised on first use and kept."""

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._ready = False
        #: Why there is no GPU; set once, since a driver does not appear while we run.
        self._unavailable: str | None = None

    def _start(self) -> bool:
        with self._lock:
            if self._ready or self._unavailable:
                return self._ready
            if self._module is None:
                try:
                    self._module = importlib.import_module("pynvml")
                except ImportError:
                    self._unavailable = "no NVIDIA GPU: nvidia-ml-py is not installed"
                    return False
            nv = self._module
            try:
                nv.nvmlInit()
            except nv.NVMLError as err:
                names = {getattr(nv, name, None): text for name, text in _INIT_FAILURES.items()}
                self._unavailable = names.get(getattr(err, "value", None), f"no NVIDIA GPU: NVML failed to start ({err})")
                return False
            except OSError as err:
                self._unavailable = f"no NVIDIA GPU: NVML could not be loaded ({err})"
                return False
            self._ready = True
            return True

    def _call(self, function: str, *args: Any) -> Any:
        """One NVML call; its failure, whatever the reason, is N/A."""
        nv = self._module
        fn = getattr(nv, function, None)
        if fn is None:
            return None
        failures = (nv.NVMLError, getattr(nv, "NVMLLibraryMismatchError", nv.NVMLError), UnicodeDecodeError)
        try:
            return fn(*args)
        except failures:
            return None

    def read(self, workers: dict[int, str] | None = None) -> GpuSnapshot:
        """Every GPU now; `workers` maps our worker pids to experiment names."""
        if not self._start():
            return GpuSnapshot(available=False, message=self._unavailable or "")
        count = self._call("nvmlDeviceGetCount")
        if not count:
            return GpuSnapshot(available=False, message="no NVIDIA GPU: the driver reports none")
        gpus = [self._read_gpu(index, workers or {}) for index in range(count)]
        return GpuSnapshot(available=True, message=f"{count} NVIDIA GPU{'s' if count > 1 else ''}", gpus=gpus)

    def _read_gpu(self, index: int, workers: dict[int, str]) -> GpuInfo:
        gpu = GpuInfo(index=index)
        handle = self._call("nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            return gpu
        name = self._call("nvmlDeviceGetName", handle)
        gpu.name = name.decode(errors="replace") if isinstance(name, bytes) else name
        util = self._call("nvmlDeviceGetUtilizationRates", handle)
        gpu.utilization = int(util.gpu) if util is not None else None
        memory = self._call("nvmlDeviceGetMemoryInfo", handle)
        if memory is not None:
            gpu.memory_used, gpu.memory_total = int(memory.used), int(memory.total)
        used: dict[int, int | None] = {}
        for function in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for proc in self._call(function, handle) or []:
                # A process may be listed as both compute and graphics: keep what is known.
                known = used.get(proc.pid)
                used[proc.pid] = proc.usedGpuMemory if known is None else max(known, proc.usedGpuMemory or 0)
        gpu.processes = [GpuProcess(pid=pid, used_memory=mem, experiment=workers.get(pid)) for pid, mem in used.items()]
        return gpu

    def shutdown(self) -> None:
        with self._lock:
            if self._ready:
                self._call("nvmlShutdown")
                self._ready = False


def read_gpus(module: Any = None, workers: dict[int, str] | None = None) -> GpuSnapshot:
    """One reading, for a command that asks once."""
    nvml = Nvml(module)
    try:
        return nvml.read(workers)
    finally:
        nvml.shutdown()


class GpuSampler(threading.Thread):
    """Reads the GPUs every `interval` seconds and hands each snapshot to `callback`.
    With no NVIDIA GPU it reports that once and ends."""

    def __init__(self, read: Callable[[dict[int, str]], GpuSnapshot], workers: Callable[[], dict[int, str]],
                 callback: Callable[[GpuSnapshot], None], interval: float = 1.0) -> None:
        super().__init__(name="gpu-sampler", daemon=True)
        self._read = read
        self._workers = workers
        self._callback = callback
        self._interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            snapshot = self._read(self._workers())
            self._callback(snapshot)
            if not snapshot.available or self._stopped.wait(self._interval):
                return

    def stop(self) -> None:
        self._stopped.set()


class GpuWatch:
    """A supervisor's knowledge of the GPUs: the latest reading, where its own workers
    sit, and a sample kept in the run folder every `record_interval` seconds (the
    report's GPU history; the events of every second are only shown). Not thread-safe:
    its owner serialises access."""

    def __init__(self, read: Callable[[dict[int, str]], GpuSnapshot], keep: Callable[[GpuSample], None],
                 record_interval: float) -> None:
        self._read = read
        self._keep = keep
        self._record_interval = record_interval
        self._recorded_at: float | None = None
        self.snapshot = GpuSnapshot(available=False, message="not read yet")

    def view(self, workers: Iterable[tuple[int | None, str, int | None]]) -> tuple[GpuSnapshot, Counter[int]]:
        """The GPUs now, and per GPU how many of `workers` (pid, experiment, GPU) sit on
        it unlisted by NVML: just started, the memory they are about to take still shows
        as free, so placement counts them."""
        workers = list(workers)
        self.snapshot = self._read({pid: name for pid, name, _ in workers if pid})
        listed = {p.pid for g in self.snapshot.gpus for p in g.processes}
        placed = Counter(gpu for pid, _, gpu in workers if gpu is not None and pid not in listed)
        return self.snapshot, placed

    def record(self, snapshot: GpuSnapshot) -> GpuSample:
        """A reading the sampler made: kept as the latest, and in the run folder when due."""
        self.snapshot = snapshot
        sample = GpuSample.of(snapshot)
        now = time.monotonic()
        if self._recorded_at is None or now - self._recorded_at >= self._record_interval:
            self._keep(sample)
            self._recorded_at = now
        return sample
