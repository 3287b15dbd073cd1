"""Worker processes on this machine.

Each worker is a `spawn`ed process with its own duplex pipe: events one way, control
the other. (One shared multiprocessing.Queue would be simpler, but a worker SIGKILLed
while holding the queue's write lock would silence every other worker.) The pipe
closing is also how each side learns that the other died. The process's target is
the contract's `start_worker`, which imports the engine only in the new process.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait as wait_for_connections
from typing import Any

from sa2va_contract.events import ControlMessage
from sa2va_contract.gpus import GpuSnapshot
from sa2va_contract.worker import WORKER_MAIN, WorkerSpec, start_worker
from sa2va_tui.gpus import Nvml
from sa2va_tui.placement.base import Arrival, Exit, LaunchError

#: How long an exited process may take to be reaped before it is killed for good.
REAP_S = 5.0


@dataclass(eq=False)
class LocalWorker:
    spec: WorkerSpec
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    closed: bool = field(default=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid


class LocalBackend:
    """Processes on this machine; GPUs as this machine's NVML reports them."""

    def __init__(self, nvml: Any = None) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._wake_r, self._wake_w = self._mp.Pipe(duplex=False)
        self.nvml = Nvml(nvml)
        # Multiprocessing hands sys.stderr's descriptor to the resource tracker it starts
        # with the first spawned worker; a front end started after this (Textual's stderr
        # has fileno() -1) would make that fail. Start the tracker while stderr is real.
        resource_tracker.ensure_running()

    def launch(self, spec: WorkerSpec) -> LocalWorker:
        ours, theirs = self._mp.Pipe(duplex=True)
        process = self._mp.Process(target=start_worker, args=(WORKER_MAIN, spec, theirs), name=f"sa2va-{spec.name}")
        try:
            process.start()
        except (OSError, ValueError, TypeError) as err:  # no fork left, no fd left, an unpicklable config
            ours.close()
            raise LaunchError(f"could not start a worker process: {err}") from None
        finally:
            # Only the worker may hold its end: then its death reads as end-of-file here.
            theirs.close()
        return LocalWorker(spec, process, ours)

    def wait(self, workers: list[LocalWorker], timeout: float) -> list[Arrival]:
        by_conn = {w.conn: w for w in workers if not w.closed}
        arrivals: list[Arrival] = []
        for conn in wait_for_connections([*by_conn, self._wake_r], timeout=timeout):
            if conn is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
            else:
                arrivals += self._receive(by_conn[conn])
        # Exits the pipe did not reveal: a child of the worker may hold its end open.
        for worker in workers:
            if not worker.closed and not worker.process.is_alive():
                arrivals += self._receive(worker)
                if not worker.closed:
                    arrivals.append((worker, self._reap(worker)))
        return arrivals

    def _receive(self, worker: LocalWorker) -> list[Arrival]:
        arrivals: list[Arrival] = []
        try:
            while worker.conn.poll():
                arrivals.append((worker, worker.conn.recv()))
        except (EOFError, OSError):
            arrivals.append((worker, self._reap(worker)))
        return arrivals

    def _reap(self, worker: LocalWorker) -> Exit:
        worker.closed = True
        worker.process.join(timeout=REAP_S)
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join(timeout=REAP_S)
        worker.conn.close()
        return Exit(worker.process.exitcode)

    def send(self, worker: LocalWorker, message: ControlMessage) -> bool:
        try:
            worker.conn.send(message)
            return True
        except (OSError, EOFError, ValueError):  # ValueError: the connection is closed
            return False

    def kill(self, worker: LocalWorker) -> None:
        worker.process.kill()

    def wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def read_gpus(self, workers: dict[int, str]) -> GpuSnapshot:
        return self.nvml.read(workers)

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()
        self.nvml.shutdown()
