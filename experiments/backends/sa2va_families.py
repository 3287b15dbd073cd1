"""Sa2VA checkpoint families: telling them apart from `config.json`, what each needs
installed, and the upstream layout for a model split over several GPUs.

Pure Python (json, importlib): `sa2va-tui check` calls it from the UI process, which
never imports torch or transformers.

What the released remote code (bytedance/Sa2VA `projects/sa2va/hf/models*/`) shows:
- InternVL-based checkpoints ship `modeling_sa2va_chat.py` (`Sa2VAChatModel`): a tokenizer
  drives `predict_forward`; the code imports peft, timm, einops, torchvision, and the
  InternLM2 tokenizer needs sentencepiece. Upstream pins transformers 4.49.0 for
  InternVL2/2.5 ("legacy") and 4.57.0 for InternVL3 and the Qwen families ("latest").
- Qwen2.5-VL and Qwen3-VL checkpoints ship `modeling_sa2va_qwen.py` (`Sa2VAChatModelQwen`):
  `predict_forward` asserts `processor is not None` (an AutoProcessor), and the module
  imports `qwen_vl_utils` at its top.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

#: Set to "module:function" to load something other than transformers' AutoModel (the
#: tests' stand-in); read only by the loader and by `check`, which both say so.
LOADER_ENV = "SA2VA_TUI_SA2VA_LOADER"


class FamilyError(Exception):
    """config.json does not say which Sa2VA this is; the message is one line."""


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    #: transformers versions that work: [low, high).
    transformers_low: tuple[int, ...]
    transformers_high: tuple[int, ...]
    #: (import name, pip name) of what the remote code imports beyond torch/transformers.
    modules: tuple[tuple[str, str], ...]
    #: The pip extra of this project that installs all of it.
    extra: str
    #: `predict_forward` needs `processor=` (an AutoProcessor) instead of `tokenizer=`.
    needs_processor: bool
    #: The upstream multi-GPU layout exists for it (InternVL's `language_model.model.layers`).
    splittable: bool

    @property
    def transformers_spec(self) -> str:
        low, high = ".".join(map(str, self.transformers_low)), ".".join(map(str, self.transformers_high))
        return f">={low},<{high}"


_INTERNVL_MODULES = (("peft", "peft"), ("timm", "timm"), ("einops", "einops"), ("sentencepiece", "sentencepiece"),
                     ("torchvision", "torchvision"))
_QWEN_MODULES = (("qwen_vl_utils", "qwen-vl-utils"), ("torchvision", "torchvision"))

FAMILIES: dict[str, Family] = {
    "internvl2_5": Family("internvl2_5", "InternVL2/2.5", (4, 49, 0), (4, 50), _INTERNVL_MODULES, "sa2va-legacy",
                          needs_processor=False, splittable=True),
    "internvl3": Family("internvl3", "InternVL3", (4, 57), (5,), _INTERNVL_MODULES, "sa2va",
                        needs_processor=False, splittable=True),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2.5-VL", (4, 57), (5,), _QWEN_MODULES, "sa2va",
                         needs_processor=True, splittable=False),
    "qwen3_vl": Family("qwen3_vl", "Qwen3-VL", (4, 57), (5,), _QWEN_MODULES, "sa2va",
                       needs_processor=True, splittable=False),
}

#: Hidden sizes of the Qwen2 language models in the released InternVL-based checkpoints:
#: InternVL2.5 (Sa2VA-1B, -4B: Qwen2.5-0.5B/3B-Instruct) and InternVL3 (Sa2VA-InternVL3-2B,
#: -8B, -14B: Qwen2.5-1.5B/7B/14B). Both name Qwen2ForCausalLM; nothing else in
#: config.json tells them apart.
_QWEN2_HIDDEN_SIZES = {896: "internvl2_5", 2048: "internvl2_5", 1536: "internvl3", 3584: "internvl3", 5120: "internvl3"}
_INTERNVL2_LLMS = {"InternLM2ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM"}


@dataclass(frozen=True)
class Detected:
    family: Family
    #: How it was told, for `check` to print.
    reason: str


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FamilyError(f"backend.model_path: {config}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise FamilyError(f"backend.model_path: {config}: not a JSON object")
    return data


def _model_types(node: Any) -> set[str]:
    """Every `model_type` anywhere in a config (sub-configs name their own)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "model_type" and isinstance(value, str):
                found.add(value)
            found |= _model_types(value)
    return found


def detect_family(path: Path, override: str | None = None) -> Detected:
    """The family of the checkpoint in `path`, from its config.json (architectures and
    auto_map), or the one `backend.family` names."""
    if override is not None:
        return Detected(FAMILIES[override], "backend.family")
    config = read_checkpoint_config(path)
    architectures = [str(a) for a in config.get("architectures") or []]
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    model_code = " ".join(str(v) for v in auto_map.values())
    if "Sa2VAChatModelQwen" in architectures or "modeling_sa2va_qwen" in model_code:
        if any(t.startswith("qwen3_vl") for t in _model_types(config)):
            return Detected(FAMILIES["qwen3_vl"], "Sa2VAChatModelQwen with a qwen3_vl sub-config")
        return Detected(FAMILIES["qwen2_5_vl"], "Sa2VAChatModelQwen without a qwen3_vl sub-config")
    if "Sa2VAChatModel" in architectures or "modeling_sa2va_chat" in model_code:
        return _internvl_family(config, path)
    raise FamilyError(
        f"backend.model_path: {path / 'config.json'}: not a Sa2VA checkpoint (architectures {architectures or 'none'}, "
        f"auto_map {sorted(auto_map) or 'none'}; expected Sa2VAChatModel or Sa2VAChatModelQwen)"
    )


def _internvl_family(config: dict, path: Path) -> Detected:
    llm = config.get("llm_config") if isinstance(config.get("llm_config"), dict) else {}
    llm_arch = str((llm.get("architectures") or ["?"])[0])
    if llm_arch in _INTERNVL2_LLMS:
        return Detected(FAMILIES["internvl2_5"], f"Sa2VAChatModel with {llm_arch}")
    if llm_arch == "Qwen3ForCausalLM":
        return Detected(FAMILIES["internvl3"], "Sa2VAChatModel with Qwen3ForCausalLM (the newer code only)")
    if llm_arch == "Qwen2ForCausalLM":
        hidden = llm.get("hidden_size")
        key = _QWEN2_HIDDEN_SIZES.get(hidden) if isinstance(hidden, int) else None
        if key is not None:
            return Detected(FAMILIES[key], f"Sa2VAChatModel with Qwen2ForCausalLM of hidden size {hidden}")
        raise FamilyError(
            f"backend.model_path: {path / 'config.json'}: a Qwen2-based InternVL checkpoint of hidden size {hidden} "
            f"is InternVL2.5 or InternVL3; set backend.family: internvl2_5 or internvl3"
        )
    raise FamilyError(f"backend.model_path: {path / 'config.json'}: language model {llm_arch} is not one Sa2VA ships")


# --- what each family needs installed -------------------------------------------------


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece.split("+")[0] if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def installed(family: Family) -> dict[str, str | None]:
    """What is installed of what the family needs: transformers' version, and for every
    module "yes" or None. Looks at package metadata; imports nothing."""
    found: dict[str, str | None] = {}
    try:
        found["transformers"] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        found["transformers"] = None
    for module, _pip in family.modules:
        found[module] = "yes" if importlib.util.find_spec(module) is not None else None
    return found


def requirement_problems(family: Family, path: Path, have: Mapping[str, str | None]) -> list[str]:
    """One line per missing or wrong requirement, each naming what to install."""
    install = f"pip install -e '.[{family.extra}]'"
    transformers = have.get("transformers")
    problems = []
    if transformers is None:
        problems.append(f"backend.model_path: {path} is {family.label}-based and needs transformers"
                        f"{family.transformers_spec}: {install}")
    elif not family.transformers_low <= version_tuple(transformers)[:3] < family.transformers_high:
        problems.append(f"backend.model_path: {path} is {family.label}-based and needs transformers"
                        f"{family.transformers_spec}, not {transformers}: {install}")
    for module, pip_name in family.modules:
        if have.get(module) is None:
            problems.append(f"backend.model_path: {path}: its {family.label} model code imports {module}: "
                            f"pip install {pip_name} (or {install})")
    return problems


def loader_override() -> str | None:
    """The "module:function" that replaces transformers' loading, when set."""
    return os.environ.get(LOADER_ENV) or None


# --- several GPUs -------------------------------------------------------------------


#: Modules the upstream multi-GPU recipe keeps on the first GPU: the vision side, the
#: embeddings and the output head (and the last layer, added below) must sit with the
#: code's hard-coded `.cuda()` inputs; the grounding encoder and text_hidden_fcs too.
_FIRST_GPU_MODULES = ("vision_model", "mlp1", "language_model.model.tok_embeddings",
                      "language_model.model.embed_tokens", "language_model.output", "language_model.model.norm",
                      "language_model.lm_head", "grounding_encoder", "text_hidden_fcs")


def split_device_map(num_layers: int, num_gpus: int) -> dict[str, int]:
    """The upstream layout of an InternVL-based Sa2VA over `num_gpus` GPUs: the first
    GPU, which also holds the vision model and SAM2, takes about half a share of the
    language model's layers, the others a full share each."""
    if num_gpus < 2:
        raise ValueError("a split layout needs at least two GPUs")
    share = math.ceil(num_layers / (num_gpus - 0.5))
    per_gpu = [math.ceil(share * 0.5)] + [share] * (num_gpus - 1)
    device_map: dict[str, int] = {}
    layer = 0
    for gpu, count in enumerate(per_gpu):
        for _ in range(count):
            if layer < num_layers:
                device_map[f"language_model.model.layers.{layer}"] = gpu
                layer += 1
    for module in _FIRST_GPU_MODULES:
        device_map[module] = 0
    device_map[f"language_model.model.layers.{num_layers - 1}"] = 0
    return device_map


def llm_layer_count(path: Path) -> int:
    config = read_checkpoint_config(path)
    llm = config.get("llm_config") or {}
    layers = llm.get("num_hidden_layers") if isinstance(llm, dict) else None
    if not isinstance(layers, int) or layers < 1:
        raise FamilyError(f"backend.model_path: {path / 'config.json'}: no llm_config.num_hidden_layers to split by")
    return layers
