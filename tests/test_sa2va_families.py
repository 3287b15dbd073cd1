"""Telling Sa2VA checkpoint families apart from config.json, what each needs, and the
upstream multi-GPU layout (experiments/backends/sa2va_families.py)."""

import json

import pytest

from experiments.backends.sa2va_families import (
    FAMILIES,
    FamilyError,
    detect_family,
    requirement_problems,
    split_device_map,
)
from sa2va_standin import write_checkpoint


def internvl(tmp_path, llm_arch, **llm):
    config = {"architectures": ["Sa2VAChatModel"], "llm_config": {"architectures": [llm_arch], **llm}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("family", ["internvl2_5", "internvl3", "qwen2_5_vl", "qwen3_vl"])
def test_every_family_is_told_from_its_config_json(tmp_path, family):
    assert detect_family(write_checkpoint(tmp_path, family)).family.key == family


@pytest.mark.parametrize("llm_arch, llm, family", [
    ("InternLM2ForCausalLM", {}, "internvl2_5"),           # Sa2VA-8B, -26B
    ("Phi3ForCausalLM", {}, "internvl2_5"),                # InternVL2-4B based
    ("Qwen2ForCausalLM", {"hidden_size": 896}, "internvl2_5"),   # Sa2VA-1B
    ("Qwen2ForCausalLM", {"hidden_size": 2048}, "internvl2_5"),  # Sa2VA-4B
    ("Qwen2ForCausalLM", {"hidden_size": 3584}, "internvl3"),    # Sa2VA-InternVL3-8B
    ("Qwen3ForCausalLM", {}, "internvl3"),
])
def test_internvl_language_models(tmp_path, llm_arch, llm, family):
    assert detect_family(internvl(tmp_path, llm_arch, **llm)).family.key == family


def test_auto_map_alone_is_enough(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"auto_map": {"AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen"}, "text_config": {"model_type": "qwen3_vl_text"}}))
    assert detect_family(tmp_path).family.key == "qwen3_vl"


def test_what_cannot_be_told_says_what_to_set(tmp_path):
    with pytest.raises(FamilyError, match="is InternVL2.5 or InternVL3; set backend.family: internvl2_5 or internvl3"):
        detect_family(internvl(tmp_path, "Qwen2ForCausalLM", hidden_size=1234))
    assert detect_family(tmp_path, override="internvl3").family.key == "internvl3"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(FamilyError, match="not a Sa2VA checkpoint .*expected Sa2VAChatModel or Sa2VAChatModelQwen"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FamilyError, match="config.json: unreadable"):
        detect_family(tmp_path)


def test_requirements_per_family(tmp_path):
    legacy, latest, qwen = FAMILIES["internvl2_5"], FAMILIES["internvl3"], FAMILIES["qwen3_vl"]
    everything = {"transformers": "4.49.0", **{m: "yes" for m, _ in legacy.modules + qwen.modules}}
    assert requirement_problems(legacy, tmp_path, everything) == []
    assert requirement_problems(latest, tmp_path, {**everything, "transformers": "4.57.1"}) == []
    (problem,) = requirement_problems(latest, tmp_path, everything)
    assert "needs transformers>=4.57,<5, not 4.49.0: pip install -e '.[sa2va]'" in problem
    (too_new,) = requirement_problems(qwen, tmp_path, {**everything, "transformers": "5.0.0"})
    assert "not 5.0.0" in too_new
    missing = requirement_problems(qwen, tmp_path, {"transformers": None, "torchvision": "yes"})
    assert missing == [
        f"backend.model_path: {tmp_path} is Qwen3-VL-based and needs transformers>=4.57,<5: pip install -e '.[sa2va]'",
        f"backend.model_path: {tmp_path}: its Qwen3-VL model code imports qwen_vl_utils: pip install qwen-vl-utils "
        "(or pip install -e '.[sa2va]')",
    ]
    (peft,) = requirement_problems(legacy, tmp_path, {**everything, "peft": None})
    assert "imports peft: pip install peft (or pip install -e '.[sa2va-legacy]')" in peft


def test_split_layout_follows_the_upstream_recipe():
    layout = split_device_map(num_layers=48, num_gpus=4)  # the 26B's InternLM2-20B
    layers = [layout[f"language_model.model.layers.{i}"] for i in range(48)]
    # The first GPU takes half a share (it also holds the vision model and SAM2)...
    assert layers.count(1) == layers.count(2) == 14 and layers[:7] == [0] * 7
    # ...and the last layer, next to the output head.
    assert layers[47] == 0 and layers.count(3) == 12
    for module in ("vision_model", "mlp1", "language_model.lm_head", "language_model.output", "grounding_encoder",
                   "text_hidden_fcs", "language_model.model.tok_embeddings", "language_model.model.embed_tokens"):
        assert layout[module] == 0
    assert len([k for k in layout if k.startswith("language_model.model.layers.")]) == 48
    with pytest.raises(ValueError):
        split_device_map(48, 1)
