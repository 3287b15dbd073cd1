"""The one typed configuration of a run, read from YAML and `--set` overrides.

Every error a researcher can make in a config becomes a `ConfigError` whose message is
one line naming the file (or the override) and the key path, so the CLI can print it
and exit 2 without a traceback.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

# The sections of where and with what, re-exported: `from sa2va_contract.config import X`
# reaches every name of the config.
from sa2va_contract.config_sections import (  # noqa: F401 - re-exported
    BUILTIN_PROMPTS,
    BackendConfig,
    DatasetConfig,
    RayConfig,
    RecoveryConfig,
    RunConfig,
    Seed,
    SplitSizes,
    Strict,
)
from sa2va_contract.layout import is_plain_name

EXPERIMENT_KINDS = ("prompt_rl", "postprocess_rl", "reward_net")

#: Train learns, val chooses, test reports.
SPLITS = ("train", "val", "test")

#: The post-processing agent's operations (`experiments.postprocess` implements them):
#: morphology acts on binary masks, threshold moves on the backend's probabilities.
MORPHOLOGY_OPS = ("dilate", "erode", "open", "close", "fill_holes", "drop_small", "bridge_gaps")
THRESHOLD_OPS = ("threshold_up", "threshold_down")
ALL_OPS = MORPHOLOGY_OPS + THRESHOLD_OPS
#: The action that ends a post-processing episode.
STOP = "stop"


class ConfigError(Exception):
    """A config that cannot be used; `str()` is the one line to show."""


# --- experiments -------------------------------------------------------------------

#: A hidden layer of no unit trains nothing, silently.
LayerWidth = Annotated[int, Field(ge=1)]


class Faults(Strict):
    """Fault injection for testing recovery on machines without a GPU."""

    #: Raise a real torch.OutOfMemoryError at this training step.
    oom_at_step: int | None = Field(None, ge=0)
    #: Only while the batch size is at least this (so the halved restart gets through).
    oom_min_batch_size: int = Field(1, ge=1)


class PPOConfig(Strict):
    # Defaults tuned for short runs (5,000 timesteps on the embedded default, val Dice
    # gain over 3 seeds): rollouts of 32 x 8 steps give about 20 updates where 256 x 8
    # gave 3, and the higher learning rate and wider layers learn the image-dependent
    # choice within them (prompt choice +0.054 against +0.005 with SB3's defaults).
    learning_rate: float = Field(1e-3, gt=0)
    n_steps: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)
    n_epochs: int = Field(10, gt=0)
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.01, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    net_arch: list[LayerWidth] = Field(default_factory=lambda: [128, 128])
    n_envs: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _batch_divides_rollout(self) -> "PPOConfig":
        rollout = self.n_steps * self.n_envs
        if rollout % self.batch_size:
            raise ValueError(f"batch_size: {self.batch_size} must divide n_steps * n_envs = {rollout}")
        return self


class ExperimentBase(Strict):
    enabled: bool = True
    seed: Seed = 0
    #: "cpu", "cuda" or "auto" (cuda when the worker has a GPU).
    device: Literal["cpu", "cuda", "auto"] = "auto"
    #: Pin a GPU index; null lets the supervisor pick the freest.
    gpu: int | None = Field(None, ge=0)
    #: GPU memory one worker needs, for the queue (null: what its first attempt
    #: peaked at, or a GPU of its own until that is known).
    gpu_memory_gb: float | None = Field(None, gt=0)
    #: ray backend: GPUs this experiment's actor asks for (a fraction shares a GPU); null:
    #: 1 for device cuda, 0 for cpu, and for auto 1 when the cluster has a GPU.
    num_gpus: float | None = Field(None, ge=0)
    #: ray backend: CPUs this experiment's actor asks for.
    num_cpus: float = Field(1.0, ge=0)
    #: ray backend: run only on this node (its `sa2va/host` label, else its host name).
    host: str | None = Field(None, min_length=1)
    faults: Faults = Faults()


class RLExperimentBase(ExperimentBase):
    total_timesteps: int = Field(5000, gt=0)
    max_steps: int = Field(3, gt=0)
    #: The reward of a step is reward_scale * (Dice change) - step_penalty.
    reward_scale: float = Field(1.0, gt=0)
    step_penalty: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(1000, gt=0)
    eval_every: int = Field(1000, gt=0)
    ppo: PPOConfig = PPOConfig()


class PromptRLConfig(RLExperimentBase):
    kind: Literal["prompt_rl"] = "prompt_rl"


class PostprocessRLConfig(RLExperimentBase):
    kind: Literal["postprocess_rl"] = "postprocess_rl"
    #: An operation moves Dice by about 0.01 where it helps and by 0.1 to 0.25 where it
    #: destroys; scaled up, the value function learns the small gains within 5,000
    #: timesteps (val Dice gain +0.017 against +0.008 at scale 1, 2 seeds).
    reward_scale: float = Field(10.0, gt=0)
    operations: list[str] = Field(
        default_factory=lambda: list(ALL_OPS),
        min_length=1,
    )
    kernel_size: int = Field(3, ge=1)
    min_component_area: int = Field(12, ge=1)
    bridge_size: int = Field(7, ge=3)
    threshold: float = Field(0.5, gt=0, lt=1)
    threshold_step: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _known_operations(self) -> "PostprocessRLConfig":
        for i, op in enumerate(self.operations):
            if op not in ALL_OPS:
                raise ValueError(f"operations.{i}: unknown operation {op!r} (known: {', '.join(ALL_OPS)})")
        return self


class RewardNetTraining(Strict):
    #: The first train images; each gives one mask per candidate prompt plus perturbed
    #: copies. Fine-tuning never uses them.
    samples: int = Field(200, gt=0)
    epochs: int = Field(8, gt=0)
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    #: Side of the square the network sees images and masks at.
    input_size: int = Field(64, ge=16)
    perturbations_per_mask: int = Field(1, ge=0)
    #: Channels of the first convolution (the others are multiples).
    width: int = Field(16, ge=4)


class FinetuneConfig(Strict):
    #: The train images after the reward network's that fine-tuning draws from (their
    #: labels are never read): images the reward network has not seen.
    samples: int = Field(200, gt=0)
    steps: int = Field(200, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    #: Weight of the penalty that keeps masks close to the starting model's.
    anchor_weight: float = Field(1.0, ge=0)


class RewardNetConfig(ExperimentBase):
    kind: Literal["reward_net"] = "reward_net"
    reward: RewardNetTraining = RewardNetTraining()
    finetune: FinetuneConfig = FinetuneConfig()


ExperimentConfig = PromptRLConfig | PostprocessRLConfig | RewardNetConfig


class Config(Strict):
    run: RunConfig = RunConfig()
    dataset: DatasetConfig = DatasetConfig()
    backend: BackendConfig = BackendConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    ray: RayConfig = RayConfig()
    prompt_rl: PromptRLConfig = PromptRLConfig()
    postprocess_rl: PostprocessRLConfig = PostprocessRLConfig()
    reward_net: RewardNetConfig = RewardNetConfig()
    #: More experiments derived from one of the three: name -> {base: <kind>, <fields to change>}.
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def experiments(self) -> dict[str, ExperimentConfig]:
        """Every enabled experiment by name, the variants resolved over their base."""
        found: dict[str, ExperimentConfig] = {}
        for kind in EXPERIMENT_KINDS:
            exp = getattr(self, kind)
            if exp.enabled:
                found[kind] = exp
        for name, variant in self.variants.items():
            exp = _resolve_variant(self, name, variant)
            if exp.enabled:
                found[name] = exp
        return found

    @model_validator(mode="after")
    def _variants_are_valid(self) -> "Config":
        for name, variant in self.variants.items():
            _resolve_variant(self, name, variant)
        return self

    @model_validator(mode="after")
    def _placement_fits_the_backend(self) -> "Config":
        for name, exp in self.experiments().items():
            problem = _placement_problem(exp, self.run.backend)
            if problem:
                raise ValueError(f"{name}.{problem}")
        return self


def _placement_problem(exp: "ExperimentConfig", backend: str) -> str | None:
    """"key: why" when an experiment asks for a placement its backend cannot give."""
    if backend == "ray":
        if exp.gpu is not None:
            return "gpu: Ray assigns GPU indices itself, so one cannot be pinned on the ray backend; pin a node with host"
        if exp.device == "cuda" and exp.num_gpus == 0:
            return "num_gpus: 0 for device cuda (the actor would see no GPU)"
    elif exp.host is not None:
        return "host: only the ray backend places experiments on nodes (run.backend: ray)"
    return None


def _resolve_variant(config: Config, name: str, variant: dict[str, Any]) -> ExperimentConfig:
    if name in EXPERIMENT_KINDS:
        raise ValueError(f"variants.{name}: a variant needs a name of its own")
    if not is_plain_name(name):
        raise ValueError(f"variants.{name!r}: not a plain name: letters, digits, '_' and '-' only (it names a folder)")
    changes = dict(variant)
    base = changes.pop("base", None)
    if base not in EXPERIMENT_KINDS:
        raise ValueError(f"variants.{name}.base: must be one of {', '.join(EXPERIMENT_KINDS)}")
    merged = _deep_merge(getattr(config, base).model_dump(mode="python"), changes)
    model = type(getattr(config, base))
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        raise ValueError(_first_error(err, prefix=f"variants.{name}")) from None


def _deep_merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --- loading -----------------------------------------------------------------------

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
}


#: How an error line shows a value: cut short, never expanded whole (YAML aliases
#: nested ten deep make a value of billions of items out of a few lines).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 3, 60, 60


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def _describe(error: dict) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    if kind == "finite_number":
        return f"must be a finite number, not {_shown(error.get('input'))}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, not {_shown(error.get('input'))}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{error['msg'].lower()}, got {_shown(error.get('input'))}"
    return error["msg"]


def _first_error(err: ValidationError, prefix: str = "") -> str:
    error = err.errors()[0]
    loc = ".".join(str(part) for part in error["loc"])
    message = _describe(error)
    # Model validators report "key: message" themselves; join their key onto the path.
    if error["type"] == "value_error" and ": " in message:
        key, message = message.split(": ", 1)
        loc = f"{loc}.{key}" if loc else key
    if prefix:
        loc = f"{prefix}.{loc}" if loc else prefix
    return f"{loc}: {message}" if loc else message


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], yaml.safe_load(value))."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text}: empty key in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: value is not valid YAML ({_yaml_problem(err)})") from None
    return path, value


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not a {type(data).__name__}")
    return data


def validate_config(data: dict, origin: str) -> Config:
    """A config from plain data (a config changed by a command, as `launch --seeds`
    does); a mistake is a ConfigError naming `origin`."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{origin}: {_first_error(err)}") from None


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate. `path` None means all defaults."""
    source = str(path) if path is not None else "<defaults>"
    from_file = read_yaml(Path(path)) if path is not None else {}
    data = copy.deepcopy(from_file)
    #: Key paths (each override's, and the sections it created) -> the override.
    overridden: dict[str, str] = {}
    for text in overrides:
        overridden.update(_apply_override(data, text))
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_blame(err, from_file, overrides, overridden, source)) from None
    _resolve_paths(config, Path(path).parent if path is not None else Path.cwd())
    return config


def _apply_override(data: dict, text: str) -> dict[str, str]:
    """Set one `--set` value in `data`; the key paths it wrote or created."""
    keys, value = parse_override(text)
    written: dict[str, str] = {}
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
            written[".".join(keys[: depth + 1])] = text
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {text}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value
    written[".".join(keys)] = text
    return written


def _blame(err: ValidationError, from_file: dict, overrides: list[str] | tuple[str, ...],
           overridden: dict[str, str], source: str) -> str:
    """The one line of a config that does not validate, naming what made it wrong: the
    override whose key it is or that created its section; else, when the file alone
    is valid, the first override after which it is not (a value another key is checked
    against); else the file."""
    line = _first_error(err)
    loc = line.split(": ", 1)[0]
    for key, text in overridden.items():
        if loc == key or loc.startswith(key + "."):
            return f"--set {text}: {line}"
    if overrides:
        try:
            Config.model_validate(from_file)
        except ValidationError:
            return f"{source}: {line}"
        data = copy.deepcopy(from_file)
        for text in overrides:
            _apply_override(data, text)
            try:
                Config.model_validate(data)
            except ValidationError as stage:
                return f"--set {text}: {_first_error(stage)}"
    return f"{source}: {line}"


def _resolve_paths(config: Config, base: Path) -> None:
    """Relative data paths in a config file mean relative to the working directory, as a
    researcher types them on the command line; nothing to do but make them absolute
    once so that workers started elsewhere agree."""
    del base
    for section, key in (("dataset", "root"), ("dataset", "manifest"), ("backend", "weights"), ("backend", "cache_dir")):
        obj = getattr(config, section)
        value = getattr(obj, key)
        if value is not None:
            setattr(obj, key, Path(value).expanduser().resolve())
    config.run.logs_dir = config.run.logs_dir.expanduser().resolve()


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
