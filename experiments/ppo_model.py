"""The PPO model of an experiment: built from the config, saved whole, read back.

Every zip is read back by `load_ppo`, never by `PPO.load`: SB3 unpickles entries of a
zip's `data` (the schedules, the spaces, the policy class), so a planted payload would
run. Ours takes only plain numbers from `data`, tensors from the `.pth` entries with
`weights_only=True`, and rebuilds the rest from the config.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from experiments.checkpoints import CheckpointError, DamagedFile, damage_reason, newest_loadable, ppo_checkpoints
from experiments.harness import WorkerContext
from sa2va_contract.config import PPOConfig
from sa2va_contract.files import atomic_writer
from sa2va_contract.layout import BEST_MODEL, FINAL_MODEL

#: The counters of a PPO zip's `data` that a loaded model takes over; everything else
#: there is the config's, rebuilt.
_COUNTERS = ("num_timesteps", "_n_updates", "_episode_num")


def build_ppo(ppo: PPOConfig, env: VecEnv, seed: int, device: str) -> PPO:
    """Every hyperparameter from the config."""
    return PPO(
        "MlpPolicy",
        env,
        learning_rate=ppo.learning_rate,
        n_steps=ppo.n_steps,
        batch_size=ppo.batch_size,
        n_epochs=ppo.n_epochs,
        gamma=ppo.gamma,
        gae_lambda=ppo.gae_lambda,
        clip_range=ppo.clip_range,
        ent_coef=ppo.ent_coef,
        vf_coef=ppo.vf_coef,
        max_grad_norm=ppo.max_grad_norm,
        policy_kwargs={"net_arch": list(ppo.net_arch)},
        seed=seed,
        device=device,
        verbose=0,
    )


def save_model_atomically(model: PPO, path: Path) -> None:
    """So that a reader (a restart, the evaluation from another terminal) never loads a
    half-written zip."""
    with atomic_writer(path) as handle:
        model.save(handle)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the most timesteps in `folder` (or `folder/checkpoints`)."""
    found = ppo_checkpoints(folder)
    return found[0] if found else None


def read_ppo_zip(path: Path) -> tuple[dict[str, int], dict[str, dict]]:
    """The counters and the state dicts of a PPO zip as SB3 writes it, with nothing
    unpickled: `data` is parsed as JSON and only its plain counters are kept, the
    `.pth` entries are loaded with `weights_only=True`."""
    import torch

    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if "data" not in names or "policy.pth" not in names:
            raise DamagedFile("not a PPO checkpoint (no data or policy.pth in the zip)")
        try:
            data = json.loads(archive.read("data").decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise DamagedFile(f"its data entry is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise DamagedFile("its data entry is not a JSON object")
        counters = {}
        for key in _COUNTERS:
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DamagedFile(f"its data entry {key} is not a count ({value!r})")
            counters[key] = value
        states = {}
        for name in ("policy", "policy.optimizer"):
            if f"{name}.pth" in names:
                states[name] = torch.load(io.BytesIO(archive.read(f"{name}.pth")), map_location="cpu",
                                          weights_only=True)
    return counters, states


def load_ppo(path: Path, env: VecEnv | gym.Env, ppo: PPOConfig, seed: int, device: str) -> PPO:
    """A PPO checkpoint (a checkpoint, the best or the final model) into a PPO built from
    the config on `env`: a zip of another shape fails here, not mid-training."""
    counters, states = read_ppo_zip(path)
    model = build_ppo(ppo, env, seed, device)
    model.policy.load_state_dict(states["policy"])
    if "policy.optimizer" in states:
        model.policy.optimizer.load_state_dict(states["policy.optimizer"])
    for key, value in counters.items():
        setattr(model, key, value)
    return model


def load_policy(exp_dir: Path, env: VecEnv | gym.Env, ppo: PPOConfig, seed: int,
                notice: Callable[[str], None]) -> tuple[Path, PPO]:
    """The experiment's best model, else its final one, on the CPU; a damaged one is
    skipped with a line saying why. Raises DamagedFile when neither loads."""
    reasons = []
    for name in (BEST_MODEL, FINAL_MODEL):
        path = Path(exp_dir) / name
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                # Built on one environment to play it, never to train: the rollout buffer's size is moot.
                warnings.filterwarnings("ignore", message="You have specified a mini-batch size")
                return path, load_ppo(path, env, ppo, seed, "cpu")
        except Exception as err:  # noqa: BLE001 - a damaged model is reported, the next tried
            reasons.append(f"{name}: {damage_reason(err)}")
            notice(f"skipped {path}: {damage_reason(err)}")
    raise DamagedFile("; ".join(reasons) if reasons else f"no {BEST_MODEL} or {FINAL_MODEL} in {exp_dir}")


def read_best_record(path: Path, notice: Callable[[str], None]) -> dict:
    """best.json of an earlier attempt; a damaged one is said and forgotten (the best
    model is then chosen afresh from the resumed step on)."""
    if not path.is_file():
        return {}
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        notice(f"ignored {path}: {damage_reason(err)}")
        return {}
    score = best.get("score") if isinstance(best, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        notice(f"ignored {path}: not a best-model record (no numeric score)")
        return {}
    return best


def resume_point(ctx: WorkerContext, load: Callable[[Path], PPO]) -> tuple[Path, PPO] | None:
    """The newest loadable checkpoint of the experiment (`ctx.resume_from` names one, or a
    folder of them for `run_one --resume DIR`), loaded; None to start afresh."""
    asked = ctx.resume_from
    if asked is not None and Path(asked).is_dir():
        found = ppo_checkpoints(Path(asked))
        if not found:
            raise CheckpointError(f"{asked} holds no checkpoint to resume from")
        return newest_loadable(ctx.exp_dir, None, found, load, ctx.notice)
    return newest_loadable(ctx.exp_dir, asked, ppo_checkpoints(ctx.exp_dir), load, ctx.notice)
