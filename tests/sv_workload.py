"""Stand-in experiments with the real contract (`run(ctx) -> dict`), for the supervisor's
tests until the three experiments exist: a loop of real torch training steps that
checkpoints atomically and honours `ctx.step_point`, and a few misbehaving entries.

Registered by "module:function" (this folder is on the workers' sys.path, which spawn
copies from the parent), e.g. `entry_points={"prompt_rl": "sv_workload:run"}`.
"""

from __future__ import annotations

import os
import sys
import time

from experiments.harness import StopRequested, WorkerContext

#: Each step also waits this long, standing in for a model call, so that a run lasts
#: long enough to be paused, killed and stopped while the CPU stays free.
STEP_SECONDS = 0.01


def _plan(ctx: WorkerContext) -> tuple[int, int]:
    """(total steps, checkpoint every) from whichever experiment config this is."""
    exp = ctx.experiment
    if exp.kind == "reward_net":
        return exp.finetune.steps, max(1, exp.finetune.steps // 4)
    return exp.total_timesteps, exp.checkpoint_every


def run(ctx: WorkerContext) -> dict:
    # Imported here so that the other entries of this module stay light.
    import torch

    total, every = _plan(ctx)
    ctx.phase("loading_model")
    torch.manual_seed(ctx.experiment.seed)
    model = torch.nn.Linear(8, 1)
    true_w = torch.arange(8, dtype=torch.float32) / 8
    step = start = 0
    if ctx.resume_from is not None:
        state = torch.load(ctx.resume_from, weights_only=True)
        model.load_state_dict(state["model"])
        step = start = int(state["step"])
    ckpt_dir = ctx.exp_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)

    def save() -> None:
        path = ckpt_dir / f"ckpt_{step}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "step": step}, tmp)
        os.replace(tmp, path)
        ctx.checkpoint_saved(path, step)

    ctx.phase("training")
    loss = torch.tensor(0.0)
    try:
        while step < total:
            ctx.step_point(step)
            x = torch.randn(ctx.batch_size, 8)
            loss = ((model(x).squeeze(1) - x @ true_w) ** 2).mean()
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                # Plain SGD by hand: torch.optim's first use costs a second of imports.
                for param in model.parameters():
                    param -= 0.05 * param.grad
            time.sleep(STEP_SECONDS)
            step += 1
            ctx.progress(step, total)
            if step % 10 == 0:
                ctx.metrics(step, {"train/loss": loss.item(), "rollout/ep_rew_mean": -loss.item()})
            if step % every == 0:
                save()
    except StopRequested:
        save()
        raise
    ctx.phase("evaluating")
    return {
        "timesteps": step,
        "resumed_at": start,
        "batch_size": ctx.batch_size,
        "loss": loss.item(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def probe(ctx: WorkerContext) -> dict:
    """Writes to every output a process has, and reports its environment."""
    print("probe: print to stdout")
    print("probe: print to stderr", file=sys.stderr)
    os.write(1, b"probe: raw write to fd 1\n")
    os.write(2, b"probe: raw write to fd 2\n")
    return {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "torch_loaded_before_entry": "torch" in sys.modules,
        "exp_dir": str(ctx.exp_dir),
    }


def fail(ctx: WorkerContext) -> dict:
    print("fail: about to go wrong")
    raise ValueError("the stand-in experiment failed on purpose")


def stuck(ctx: WorkerContext) -> dict:
    """Never reaches a step point: only a hard kill ends it."""
    time.sleep(300)
    return {}


def vanish(ctx: WorkerContext) -> dict:
    """Exits without a word, as a crash in native code would."""
    print("vanish: leaving", flush=True)
    os._exit(7)


def oom(ctx: WorkerContext) -> dict:
    """Runs out of memory at once, as the allocator reports it (without loading torch)."""
    raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB (batch size {ctx.batch_size})")
