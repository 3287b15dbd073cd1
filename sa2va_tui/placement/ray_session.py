"""This process's connection to Ray: a private local instance started for the run, or
an existing cluster; quiet, on loopback, and gone afterwards.

A private instance (`ray.address: local`) binds every server to 127.0.0.1 (Ray 2.60
does so only when it believes the node's address is loopback, which
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it believe, read when `ray` is imported),
runs no dashboard, uses a token held in this process's environment (none written under
the home folder), and keeps its files in a short folder under /tmp (Ray's socket paths
must fit in 107 bytes): `/tmp/sa2va-ray-<our pid>-<random>`. Its session logs are
copied into the run folder (`ray-session/`) when it stops, and the folder removed. An
instance left by a driver that was killed is found by that pid and ended at the next
start, by the pids of the processes that name its folder in their command line or
hold files open in it (Ray's agents outlive a killed driver by about a minute otherwise).

For a cluster, the tool's own packages travel with the job (`py_modules`); every node
must have the same Python environment otherwise (torch, stable-baselines3, ...).

Everything Ray says goes to `<run folder>/ray.log`: its loggers, and the "(raylet) ..."
messages its driver thread prints to stdout whatever `log_to_driver` says (through a
private hook, `ray._private.worker.print_to_stdstream`, checked by the tests against
the pinned version). `ray.init` replaces SIGTERM's handler; ours is put back.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from sa2va_contract.config import RayConfig
from sa2va_tui.placement.base import LaunchError
from sa2va_tui.runstore import pid_alive

#: The Ray release this backend was written against (the `ray` extra pins it).
RAY_VERSION = "2.60.0"
RAY_LOG = "ray.log"
SESSION_LOGS = "ray-session"
TEMP_PREFIX = "sa2va-ray-"
NAMESPACE = "sa2va"
#: The environment a private instance is started with (restored when it stops).
_PRIVATE_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED",
                "RAY_TMPDIR", "RAY_ADDRESS")
#: What the tool's own code is, for the workers of a cluster.
_PACKAGES = ("sa2va_contract", "sa2va_tui", "experiments")


_TOKEN: list[str] = []


def _process_token() -> str:
    """One token for every private instance of this process: Ray caches the first it reads."""
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


def _short_tmp() -> Path:
    return Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())


def end_leftovers(tmp_root: Path | None = None) -> list[int]:
    """End the processes of private instances whose driver is gone (killed before it could
    stop them), and remove their folders. Returns the pids it ended."""
    ended: list[int] = []
    for folder in (tmp_root or _short_tmp()).glob(f"{TEMP_PREFIX}*"):
        found = re.match(rf"{TEMP_PREFIX}(\d+)-", folder.name)
        if not found or pid_alive(int(found.group(1))):
            continue
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if proc.stat().st_uid == os.getuid() and _names_folder(proc, str(folder)):
                    os.kill(int(proc.name), signal.SIGKILL)
                    ended.append(int(proc.name))
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to look at
        shutil.rmtree(folder, ignore_errors=True)
    return ended


def _names_folder(proc: Path, folder: str) -> bool:
    """Whether a process's command line names `folder`, or one of its open files lies in
    it (Ray's agents rename themselves, "ray::DashboardAgent", but keep their logs open)."""
    if folder.encode() in (proc / "cmdline").read_bytes():
        return True
    for fd in (proc / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(folder + "/"):
                return True
        except OSError:
            continue
    return False


class RaySession:
    """Ray, started (or joined) by `start()` and left by `close()`, for one run folder."""

    def __init__(self, config: RayConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.temp_root: Path | None = None
        self._saved_env: dict[str, str | None] = {}
        self._log_handler: logging.Handler | None = None
        self._saved_log: tuple[list[logging.Handler], bool] | None = None
        self._saved_print: Callable[..., Any] | None = None
        self.ray: Any = None

    @property
    def private(self) -> bool:
        return self.config.address == "local"

    def start(self) -> None:
        """Connect; raises LaunchError (one line) when Ray cannot be started or reached."""
        self._saved_env = {key: os.environ.get(key) for key in _PRIVATE_ENV}
        if self.private:
            end_leftovers()
            self.temp_root = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=_short_tmp()))
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ.setdefault("RAY_AUTH_TOKEN", _process_token())
            os.environ["RAY_TMPDIR"] = str(self.temp_root)
            os.environ.pop("RAY_ADDRESS", None)
        elif re.match(r"^(127\.0\.0\.1|localhost)(:|$)", self.config.address):
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        try:
            import ray
        except ImportError:
            self._restore_env()
            raise LaunchError("run.backend ray needs Ray: pip install -e '.[ray]' (ray==2.60.0)") from None
        self.ray = ray
        try:
            self._init()
        except BaseException:
            self.close()
            raise

    def _init(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            raise LaunchError("this process is already connected to Ray; one run's backend at a time")
        if self.private:
            # Ray read the variable when it was first imported; a process that imported it
            # before would bind to the network: say loopback once more, where it is read.
            import ray._private.ray_constants as constants

            constants.ENABLE_RAY_CLUSTER = False
        self._quiet()
        if ray.__version__ != RAY_VERSION:
            logging.getLogger("ray").warning("sa2va-tui was checked against Ray %s, this is %s", RAY_VERSION,
                                             ray.__version__)
        common = dict(log_to_driver=False, configure_logging=True, namespace=NAMESPACE)
        handlers = _signal_handlers()
        try:
            if self.private:
                assert self.temp_root is not None
                ray.init(address="local", include_dashboard=False, _temp_dir=str(self.temp_root / "ray"),
                         num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus,
                         object_store_memory=self.config.object_store_mb * 2**20, **common)
            else:
                ray.init(address=self.config.address, runtime_env=_shipped_code(), **common)
        except Exception as err:  # noqa: BLE001 - Ray raises many kinds; each becomes one line
            where = "a private Ray instance" if self.private else f"the Ray cluster at {self.config.address}"
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise LaunchError(f"ray.address: could not start or reach {where}: {first}") from None
        finally:
            _restore_signal_handlers(handlers)

    def _quiet(self) -> None:
        """Ray's logger and its driver's printed messages into ray.log, nothing on screen."""
        import ray._private.worker as ray_worker

        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / RAY_LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger = logging.getLogger("ray")
        self._saved_log = (list(ray_logger.handlers), ray_logger.propagate)
        # Replaced, not cleared: a "ray" logger without handlers would fall through to
        # logging.lastResort, which writes to stderr.
        ray_logger.handlers[:] = [handler]
        ray_logger.propagate = False
        self._log_handler = handler
        self._saved_print = ray_worker.print_to_stdstream
        lock = threading.Lock()

        def into_ray_log(data: dict, ignore_prefix: bool = False) -> None:
            with lock:
                for line in data.get("lines", []):
                    handler.stream.write(f"({data.get('pid', '?')}) {line}\n")
                handler.flush()

        ray_worker.print_to_stdstream = into_ray_log

    def close(self) -> None:
        """Leave Ray (stopping a private instance), keep its logs, restore this process."""
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()
        if self.ray is not None and self._saved_print is not None:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream = self._saved_print
        if self._saved_log is not None:
            ray_logger = logging.getLogger("ray")
            ray_logger.handlers[:], ray_logger.propagate = self._saved_log
            self._saved_log = None
        if self._log_handler is not None:
            self._log_handler.close()
            self._log_handler = None
        if self.temp_root is not None:
            sessions = self.temp_root / "ray" / "session_latest" / "logs"
            if sessions.is_dir():
                shutil.copytree(sessions, self.run_dir / SESSION_LOGS, dirs_exist_ok=True)
            shutil.rmtree(self.temp_root, ignore_errors=True)
            self.temp_root = None
        self._restore_env()

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}


def _shipped_code() -> dict[str, Any]:
    """The job's runtime environment on a cluster: this tool's packages, uploaded once
    (found without importing them: the engine is not for this process)."""
    modules = []
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            modules.append(str(list(spec.submodule_search_locations)[0]))
    # (A pattern such as ".*" would leave the packages empty: Ray matches it against more than their own files.)
    return {"py_modules": modules, "excludes": ["__pycache__", "*.pyc"]}


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
