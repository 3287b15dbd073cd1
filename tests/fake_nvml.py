"""A stand-in for the `pynvml` module (nvidia-ml-py) on machines without an NVIDIA driver.

It keeps the real API where `sa2va_tui.gpus` touches it: the same function names and
signatures, the same return types (pynvml's own ctypes structures and friendly objects),
and pynvml's own NVMLError classes and codes, raised the way the real library raises
them. Only the values come from here. Handed to the code under test as a module object
(`Nvml(FakeNvml(...))`), never patched into the real library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pynvml

GiB = 1024**3


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GiB
    used: int = 1 * GiB
    utilization: int = 0
    #: pid -> bytes used (None: NVML does not know, as under WDDM).
    processes: dict[int, int | None] = field(default_factory=dict)
    #: NVML function name -> NVML_ERROR_* code it fails with on this GPU.
    failing: dict[str, int] = field(default_factory=dict)


class _Handle:
    """Opaque, as the real c_nvmlDevice_t pointer is to its callers."""

    def __init__(self, index: int) -> None:
        self.index = index


class FakeNvml:
    """Module-like: attribute access as on `pynvml`."""

    NVMLError = pynvml.NVMLError
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: int | None = None,
                 failing: dict[str, int] | None = None) -> None:
        self.gpus = list(gpus or [])
        self.init_error = init_error
        #: Failures of functions that take no device handle.
        self.failing = dict(failing or {})
        self.init_count = 0
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        # The constants and error classes: NVML_ERROR_*, NVMLError_* ...
        if name.startswith(("NVML_", "NVMLError_")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _enter(self, function: str, handle: _Handle | None = None) -> FakeGpu | None:
        self.calls.append(function)
        if self.init_count <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        code = self.failing.get(function)
        if handle is not None:
            code = self.gpus[handle.index].failing.get(function, code)
        if code is not None:
            raise pynvml.NVMLError(code)
        return self.gpus[handle.index] if handle is not None else None

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        handle = _Handle(index)
        self._enter("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> pynvml.c_nvmlUtilization_t:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization, memory=gpu.utilization // 2)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version=None) -> pynvml.c_nvmlMemory_t:
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        return pynvml.c_nvmlMemory_t(total=gpu.total, free=gpu.total - gpu.used, used=gpu.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list:
        gpu = self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            pynvml.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": used, "gpuInstanceId": 0xFFFFFFFF,
                                       "computeInstanceId": 0xFFFFFFFF})
            for pid, used in gpu.processes.items()
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list:
        self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle)
        return []
