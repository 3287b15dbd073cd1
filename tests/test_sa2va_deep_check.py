"""`sa2va-tui check --deep` through the real CLI, on the stand-in Sa2VA that the loader
seam (SA2VA_TUI_SA2VA_LOADER) puts where transformers' AutoModel would be, and the
config errors about dtype and placement."""

import pytest
from typer.testing import CliRunner

from experiments.backends.sa2va_families import LOADER_ENV
from sa2va_standin import LOADS, write_checkpoint
from sa2va_tui.cli import app

from conftest import QUICK_CONFIG


def check(*args: str):
    return CliRunner().invoke(app, ["check", "-c", str(QUICK_CONFIG), *args])


def sa2va(checkpoint, *more):
    return ["--set", "backend.kind=sa2va", "--set", f"backend.model_path={checkpoint}", "--set", "dataset.limit=5",
            "--set", "reward_net.reward.samples=2", *more]


@pytest.mark.parametrize("family", ["internvl2_5", "qwen3_vl"])
def test_deep_check_on_the_stand_in(tmp_path, monkeypatch, family):
    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    checkpoint = write_checkpoint(tmp_path / family, family)
    loads = len(LOADS)
    result = check("--deep", *sa2va(checkpoint))
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{LOADER_ENV}=sa2va_standin:load_standin loads the model, not transformers" in out
    assert f"loaded {checkpoint}" in out and "on cpu" in out
    assert out.count("of the image (") == 11  # every candidate prompt, one mask each
    assert "s per mask after the first" in out
    assert "trainable path = predict_forward" in out and "masks agree on 100.00% of pixels" in out
    assert "fine-tuning: 2 steps on" in out and "(float32 masters)" in out
    assert "peak GPU memory: n/a (no CUDA: the model ran on the CPU)" in out
    # 5 train and 5 val images (limit 5) with 11 prompts each: prompt_rl's pairs, which
    # hold postprocess_rl's and the reward network's.
    assert "mask stage: 110 distinct pairs for prompt_rl, postprocess_rl, reward_net, about" in out
    assert "on 1 GPU replica over 1 GPU (" in out and "measured by check --deep" in out
    assert out.rstrip().endswith("config is ready")
    assert len(LOADS) - loads == 1  # loaded once for segmenting and fine-tuning


def test_deep_check_says_in_one_line_when_no_prompt_gives_a_mask(tmp_path, monkeypatch):
    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    checkpoint = write_checkpoint(tmp_path, "internvl3", silent_on=["Please"])  # every prompt: no [SEG]
    result = check("--deep", *sa2va(checkpoint))
    assert result.exit_code == 2
    assert result.output.count("no [SEG]: an empty mask") == 11
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: backend.prompts: no candidate prompt gave a [SEG] on ")
    assert "Traceback" not in result.output


def test_deep_check_turns_a_model_failure_into_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    checkpoint = write_checkpoint(tmp_path, "internvl2_5", internvl_flavour="internvl")

    def broken(*args, **kwargs):
        raise KeyError("vision_model.embeddings")

    monkeypatch.setattr("sa2va_standin.StandInSa2VA.predict_forward", broken)
    result = check("--deep", *sa2va(checkpoint))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == \
        "error: check --deep: segmenting failed: KeyError: 'vision_model.embeddings'"


def test_a_real_checkpoint_is_refused_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv(LOADER_ENV, raising=False)
    checkpoint = write_checkpoint(tmp_path, "qwen2_5_vl")
    result = check("--deep", *sa2va(checkpoint))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "backend.kind: sa2va needs a CUDA GPU (Sa2VA has no CPU path) and none is visible" in result.output
    assert "is Qwen2.5-VL-based and needs transformers>=4.57,<5: pip install -e '.[sa2va]'" in result.output
    assert "imports qwen_vl_utils: pip install qwen-vl-utils" in result.output
    assert "loaded" not in result.output  # nothing was loaded


def test_deep_check_is_for_sa2va_only():
    result = check("--deep")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "error: backend.kind: check --deep is for sa2va, not embedded"


@pytest.mark.parametrize("setting, message", [
    ("backend.dtype=float16", "backend.dtype: float16 is not safe, use bfloat16 (Sa2VA's code casts the model, "
                              "or its inputs, to bfloat16 on the first call)"),
    ("backend.device_map=auto", "backend.device_map: auto is not safe (Sa2VA's code hard-codes .cuda()); use split"),
    ("backend.family=internvl9", "backend.family: must be one of"),
])
def test_dtype_and_placement_errors_name_the_key(setting, message):
    result = check("--set", setting)
    assert result.exit_code == 2
    assert f"error: --set {setting}: {message}" in result.output
