"""The recovery policy, in one module of pure functions: how a failure is classified,
and what the next attempt of an experiment does (batch size, device, attempt number,
where it resumes), or why there is none.

The worker classifies the exception it caught; the supervisor classifies an exit no
report explained, decides automatic restarts and plans every new attempt; the app's
restart dialog shows the plan the supervisor will carry out, made by the same call.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

from sa2va_contract.config import ExperimentConfig, RecoveryConfig
from sa2va_contract.events import Change, RestartChanges
from sa2va_contract.files import disk_full_cause
from sa2va_contract.kinds import kind_of

#: Out of memory; failed before the first training step (import error, missing
#: checkpoint, bad data found at load: a retry would fail the same way); any other
#: crash; killed by a signal; no room left to write (a retry would find none either).
OOM, STARTUP, ERROR, KILLED, DISK_FULL = "oom", "startup", "error", "killed", "disk_full"
FAILURE_KINDS = (OOM, STARTUP, ERROR, KILLED, DISK_FULL)
#: Why an attempt starts: the first of a run, automatically after an out-of-memory
#: failure or a crash, because a person asked, or because a run is resumed.
START, RESTART_REASONS = "start", ("oom", "error", "manual", "resume")


# --- classifying failures -------------------------------------------------------------


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU allocator's out-of-memory error: torch's typed error, or CUDA's message
    wrapped in a RuntimeError by older code paths. Only these count: a smaller batch
    frees GPU memory, but a host `MemoryError` or a CPU allocator failure comes from a
    size that does not depend on the batch (a rollout buffer, a dataset), and halving
    the batch would only repeat it."""
    # An error can only be torch's if torch is loaded; asking must not load it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("CUDA out of memory" in text or "CUDA error: out of memory" in text)


def classify_exception(error: BaseException, training_started: bool = True) -> str:
    """The failure kind of an exception an experiment raised, before its first
    training step or after."""
    if disk_full_cause(error) is not None:
        return DISK_FULL
    if is_out_of_memory(error):
        return OOM
    return ERROR if training_started else STARTUP


def classify_exit(exit_code: int | None, killed_by_us: bool, grace_s: float | None) -> tuple[str, str]:
    """(kind, message) of a worker that ended without saying how: a signal, a crash in
    native code, a kill by us after a stop it did not obey."""
    if killed_by_us:
        return KILLED, f"did not stop within {grace_s or 0:g} s and was killed"
    if exit_code is not None and exit_code < 0:
        return KILLED, f"killed by {signal_name(-exit_code)}"
    return ERROR, f"exited with code {exit_code} without a report"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- batch sizes ----------------------------------------------------------------------


def smaller_batch_size(experiment: ExperimentConfig, current: int, floor: int) -> int | None:
    """The batch size after an out-of-memory failure: half of `current` or the largest
    size below that the experiment can use (for PPO, one that divides its rollout),
    never below `floor`; None when there is none left to try."""
    half = current // 2
    rollout = kind_of(experiment).rollout(experiment)
    if rollout is None:
        return half if half >= floor else None
    return next((b for b in range(half, floor - 1, -1) if rollout % b == 0), None)


def batch_size_problem(experiment: ExperimentConfig, batch_size: int) -> str | None:
    """Why the experiment cannot run at `batch_size`, or None when it can."""
    if batch_size < 1:
        return f"batch size {batch_size}: must be at least 1"
    rollout = kind_of(experiment).rollout(experiment)
    if rollout is not None and rollout % batch_size:
        return f"batch size {batch_size}: must divide n_steps * n_envs = {rollout}"
    return None


@dataclass(frozen=True)
class AutomaticRestart:
    """A new attempt recovery starts by itself: why, and at which batch size."""

    reason: str
    batch_size: int


def automatic_restart(experiment: ExperimentConfig, kind: str, failed_batch: int, oom_restarts: int,
                      error_restarts: int, recovery: RecoveryConfig,
                      killed_by_us: bool = False) -> tuple[AutomaticRestart | None, str]:
    """After a failure of `kind` at `failed_batch`: the restart recovery makes by
    itself, or None and why not. An out-of-memory failure is retried at a smaller
    batch; a failure at start-up never (it would fail the same way); any other crash
    only as often as `recovery.retry_errors` allows, at the same batch."""
    if kind == OOM:
        if oom_restarts >= recovery.max_oom_restarts:
            return None, f"out of memory, no automatic restart left ({recovery.max_oom_restarts} allowed)"
        smaller = smaller_batch_size(experiment, failed_batch, recovery.min_batch_size)
        if smaller is None:
            return None, f"out of memory at batch size {failed_batch}, the floor is {recovery.min_batch_size}"
        return AutomaticRestart("oom", smaller), ""
    if kind == STARTUP:
        return None, "failed at start-up: not retried (it would fail the same way); fix it, then restart"
    if kind == DISK_FULL:
        return None, "disk full: not retried; free some space, then resume"
    if killed_by_us:
        return None, "killed after it did not stop in time: not retried"
    if error_restarts >= recovery.retry_errors:
        return None, ("crashed: not retried (recovery.retry_errors is 0)" if not recovery.retry_errors
                      else f"crashed: no automatic restart left ({recovery.retry_errors} allowed)")
    return AutomaticRestart("error", failed_batch), ""


# --- the next attempt -----------------------------------------------------------------


@dataclass(frozen=True)
class RestartPlan:
    """What the next attempt of an experiment will do."""

    reason: str
    attempt: int
    batch_size: int
    #: The last attempt's batch size (None before any).
    previous_batch_size: int | None
    #: The GPU index the new process will get; None: the CPU.
    gpu: int | None
    previous_gpu: int | None
    #: The last attempt ended in an out-of-memory failure: the batch is halved.
    after_oom: bool
    #: The checkpoint it resumes from and its step; None: from the start.
    resume_from: str | None
    resume_step: int | None
    #: The cluster scheduler that gives the attempt its device ("Ray"); `gpu` is then None
    #: and says nothing: where it runs is known once it has started.
    placed_by: str | None = None

    @property
    def changes(self) -> RestartChanges:
        """What this attempt does differently from the last one."""
        previous = self.previous_batch_size
        moved = self.placed_by is None and self.previous_gpu != self.gpu
        return RestartChanges(
            resume_from=self.resume_from,
            batch_size=Change(previous, self.batch_size) if previous and previous != self.batch_size else None,
            gpu=Change(self.previous_gpu, self.gpu) if moved else None,
        )

    @property
    def lacks_gpu(self) -> bool:
        """Nothing gives this attempt a GPU: none was chosen, and no scheduler will."""
        return self.gpu is None and self.placed_by is None


def plan_restart(
    experiment: ExperimentConfig,
    reason: str,
    *,
    attempts: int,
    last_batch_size: int | None,
    last_gpu: int | None,
    last_failure: str | None,
    checkpoint: str | None,
    checkpoint_step: int | None,
    recovery: RecoveryConfig,
    gpu: int | None,
    batch_size: int | None = None,
    placed_by: str | None = None,
) -> RestartPlan:
    """The next attempt: at `batch_size` when given (an automatic restart decided it),
    else at half the last batch after an out-of-memory failure (the same batch when no
    smaller one is allowed), else at the last batch (the config's for the first); on
    `gpu` (None: the CPU), where the caller found room, unless a cluster scheduler
    (`placed_by`) gives it its device; from the last checkpoint (none for `START`)."""
    after_oom = last_failure == OOM
    current = last_batch_size or kind_of(experiment).batch_size(experiment)
    if batch_size is None:
        batch_size = current
        if after_oom:
            batch_size = smaller_batch_size(experiment, current, recovery.min_batch_size) or current
    return RestartPlan(
        reason=reason, attempt=attempts + 1, batch_size=batch_size, previous_batch_size=last_batch_size,
        gpu=None if placed_by else gpu, previous_gpu=last_gpu, after_oom=after_oom,
        resume_from=checkpoint if reason != START else None, resume_step=checkpoint_step if checkpoint else None,
        placed_by=placed_by,
    )
