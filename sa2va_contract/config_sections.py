"""The sections of the config that say what a run works on and where: the run itself,
the dataset, the segmentation backend, recovery and Ray. `sa2va_contract.config` gathers
them with the experiments' sections into `Config` and re-exports every name here, so
`from sa2va_contract.config import DatasetConfig` stays the way to reach them.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A config section: unknown keys are mistakes, and no number is infinite or NaN
    (`.inf` is valid YAML, and a worker would choke on it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: numpy, torch and SB3 take seeds in [0, 2**32); one outside fails in the worker.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


# --- dataset -----------------------------------------------------------------------


class SplitSizes(Strict):
    train: int = Field(800, ge=1)
    val: int = Field(240, ge=1)
    test: int = Field(240, ge=1)


class DatasetConfig(Strict):
    """`builtin`: the procedurally generated dataset; `folder`: ROOT/<split>/images and
    ROOT/<split>/masks paired by file stem."""

    kind: Literal["builtin", "folder"] = "builtin"
    seed: Seed = 0
    image_size: int = Field(128, ge=32, le=1024)
    sizes: SplitSizes = SplitSizes()
    #: Samples used per split at most (quick runs: 50); null means all.
    limit: int | None = Field(None, ge=1)
    #: builtin: "fixed" gives every image of a kind one expression ("the vessels"), as
    #: a researcher's own data does; "per_image" one that names the image's condition
    #: ("the faint vessels"), itself a candidate prompt.
    expressions: Literal["fixed", "per_image"] = "fixed"
    root: Path | None = None
    #: Referring expression for folder samples that the manifest does not describe.
    expression: str = "the blood vessels"
    #: What `{target}` means in prompt templates for folder samples.
    target: str = "blood vessels"
    #: CSV (columns stem, expression[, target]) or JSONL with the same keys.
    manifest: Path | None = None

    @model_validator(mode="after")
    def _folder_needs_root(self) -> "DatasetConfig":
        if self.kind == "folder" and self.root is None:
            raise ValueError("root: a folder dataset needs root")
        return self


# --- backend -----------------------------------------------------------------------

# The referring expressions of the built-in dataset's image conditions (plain, faint,
# thin, thick, small, large, dark part, bright part, noisy, blurry, crowded): the
# embedded model was trained on them, and which one helps depends on the image.
BUILTIN_PROMPTS = [
    "the {target}",
    "the faint {target}",
    "the thin {target}",
    "the thick {target}",
    "the small {target}",
    "the large {target}",
    "the {target} in the dark part of the image",
    "the {target} in the bright part of the image",
    "the {target} in the noisy image",
    "the blurry {target}",
    "all {target}",
]


class BackendConfig(Strict):
    kind: Literal["embedded", "sa2va"] = "embedded"
    #: embedded: a weights file (null: the weights shipped with the package).
    weights: Path | None = None
    #: sa2va: a local checkpoint folder or a hub id already in the local cache.
    model_path: str | None = None
    trust_remote_code: bool = False
    #: Only bfloat16 is safe with Sa2VA's code (see the check below).
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: sa2va: null puts the model on the worker's GPU; "split" lays an InternVL-based
    #: checkpoint over the worker's GPUs as upstream does (for one that fits no single GPU).
    device_map: Literal["split", "auto"] | None = None
    #: sa2va: internvl2_5, internvl3, qwen2_5_vl or qwen3_vl; null: told from config.json.
    family: Literal["internvl2_5", "internvl3", "qwen2_5_vl", "qwen3_vl"] | None = None
    #: Candidate prompts the prompt agent chooses among; `{target}` is the sample's target.
    prompts: list[str] = Field(default_factory=lambda: list(BUILTIN_PROMPTS), min_length=2)
    #: Index into `prompts` of the baseline prompt.
    default_prompt: int = Field(0, ge=0)
    #: Where model outputs are kept across runs (null: logs/.mask_cache).
    cache_dir: Path | None = None
    #: Images per forward pass of the embedded model (8 is fastest per image on a CPU).
    batch_size: int = Field(8, ge=1)
    #: sa2va: GPU memory (GiB) one replica of the mask stage needs; each GPU with room
    #: gets as many as fit. Null: the weights' size plus a quarter, plus 2 GiB.
    replica_memory_gb: float | None = Field(None, gt=0)
    #: sa2va: at most this many replicas in the mask stage (null: as many as fit).
    max_replicas: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _default_prompt_in_range(self) -> "BackendConfig":
        if self.default_prompt >= len(self.prompts):
            raise ValueError(f"default_prompt: {self.default_prompt} is not an index of the {len(self.prompts)} prompts")
        if self.kind == "sa2va" and not self.model_path:
            raise ValueError("model_path: the sa2va backend needs model_path")
        if self.dtype != "bfloat16":
            raise ValueError(f"dtype: {self.dtype} is not safe, use bfloat16 (Sa2VA's code casts the model, or its inputs, "
                             "to bfloat16 on the first call)")
        if self.device_map == "auto":
            raise ValueError("device_map: auto is not safe (Sa2VA's code hard-codes .cuda()); use split for upstream's "
                             "layout over several GPUs, or null")
        return self



# --- the run, recovery, Ray ---------------------------------------------------------


class RecoveryConfig(Strict):
    max_oom_restarts: int = Field(3, ge=0)
    min_batch_size: int = Field(4, ge=1)
    #: Automatic restarts (from the last checkpoint, same batch) after a crash that is
    #: neither an out-of-memory failure nor a failure at start-up; 0: none.
    retry_errors: int = Field(0, ge=0)


class RunConfig(Strict):
    logs_dir: Path = Path("logs")
    #: A label that goes into the run id.
    name: str = "run"
    #: At most this many experiments run at once (null: as many as the devices have
    #: room for); the others wait in the queue.
    max_parallel: int | None = Field(None, ge=1)
    #: A command run (without a shell) when an experiment finishes, fails for good or
    #: is restarted after an out-of-memory failure; it gets SA2VA_RUN, SA2VA_EXPERIMENT,
    #: SA2VA_EVENT and SA2VA_STATE in its environment.
    on_event: str | None = None
    #: Where workers run: `local` processes on this machine, or `ray` actors (see `ray:`).
    backend: Literal["local", "ray"] = "local"

    @model_validator(mode="after")
    def _command_parses(self) -> "RunConfig":
        if self.on_event is not None:
            try:
                argv = shlex.split(self.on_event)
            except ValueError as err:
                raise ValueError(f"on_event: not a command line ({err})") from None
            if not argv:
                raise ValueError("on_event: an empty command")
        return self


class RayConfig(Strict):
    """The ray backend (`run.backend: ray`): which Ray, and how files reach the run folder."""

    #: `local`: a private Ray instance started for the run on 127.0.0.1 (no dashboard) and
    #: stopped after it; else the address of a running cluster ("10.0.0.5:6379", "auto").
    address: str = Field("local", min_length=1)
    #: `shared`: the run folder is at the same path on every node; `ship`: workers write to
    #: node-local scratch and stream their files back with their events.
    storage: Literal["shared", "ship"] = "shared"
    #: ship: the node-local folder attempts write in (null: /tmp/sa2va-scratch on each node).
    scratch_dir: Path | None = None
    #: A local instance: the CPUs and GPUs it offers (null: what this machine has).
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    #: A local instance: its object store in MiB (ship moves files through it).
    object_store_mb: int = Field(256, ge=80)

    @model_validator(mode="after")
    def _scratch_is_absolute(self) -> "RayConfig":
        if self.scratch_dir is not None and not self.scratch_dir.is_absolute():
            raise ValueError(f"scratch_dir: {self.scratch_dir} must be an absolute path (it names a folder on every node)")
        return self
