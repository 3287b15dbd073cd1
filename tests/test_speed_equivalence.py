"""The speed-ups compute what the slower forms computed: masks described on first read
equal those described up front, the folded embedded network gives the unfolded one's
masks, losses and gradients, and the default config's PPO settings pass the check.
Real model, real cache, real configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.backends import make_cached_segmenter
from experiments.backends.embedded import load_embedded, to_batch
from experiments.datasets import load_split, render_prompt
from experiments.envs import build_prompt_table
from experiments.envs.prompt import PromptSelectEnv
from experiments.reward.network import RewardNet
from experiments.reward_net import finetune_loss
from sa2va_contract.config import load_config

from conftest import QUICK_CONFIG, ROOT, run_cli


@pytest.fixture(scope="module")
def prompt_inputs(tmp_path_factory):
    config = load_config(QUICK_CONFIG, [f"backend.cache_dir={tmp_path_factory.mktemp('cache')}"])
    return config, make_cached_segmenter(config), load_split(config.dataset, "val")[:4]


def test_masks_described_on_first_read_equal_those_described_up_front(prompt_inputs):
    config, segmenter, samples = prompt_inputs
    backend = config.backend
    lazy = build_prompt_table(samples, segmenter, backend.prompts, backend.default_prompt)
    eager = build_prompt_table(samples, segmenter, backend.prompts, backend.default_prompt, describe_all=True)
    assert lazy.mask_features.described == 0
    assert eager.mask_features.described == len(samples) * len(backend.prompts)

    # Episodes read a few masks, in their own order: only those are described.
    env = PromptSelectEnv(lazy, max_steps=2)
    observations = []
    for i, action in ((3, 5), (0, 2), (3, 0)):
        obs, _ = env.reset(options={"sample": i})
        observations.append(obs)
        observations.append(env.step(action)[0])
    assert 0 < lazy.mask_features.described < len(samples) * len(backend.prompts)

    same_env = PromptSelectEnv(eager, max_steps=2)
    replayed = []
    for i, action in ((3, 5), (0, 2), (3, 0)):
        replayed.append(same_env.reset(options={"sample": i})[0])
        replayed.append(same_env.step(action)[0])
    for got, want in zip(observations, replayed):
        np.testing.assert_array_equal(got, want)
    # And every mask, read in any order, gives the same description.
    for i in reversed(range(len(samples))):
        for k in range(len(backend.prompts)):
            np.testing.assert_array_equal(lazy.mask_features[i][k], eager.mask_features[i, k])
    np.testing.assert_array_equal(np.asarray(lazy.mask_features), np.asarray(eager.mask_features))
    assert np.asarray(eager.mask_features).shape == (len(samples), len(backend.prompts), 17)


def test_folded_network_gives_the_unfolded_masks(prompt_inputs):
    config, _, samples = prompt_inputs
    model = load_embedded(batch_size=4)
    images = [s.image for s in samples for _ in range(2)]
    prompts = [render_prompt(t, s) for s in samples for t in config.backend.prompts[:2]]
    predictions = model.segment(images, prompts)
    with torch.no_grad():
        batch, (h, w) = to_batch(images, "cpu")
        reference = torch.sigmoid(model.net.eval()(batch, prompts)[:, :h, :w]).numpy()  # the unfolded module
    for prediction, prob in zip(predictions, reference):
        np.testing.assert_allclose(prediction.prob, prob, atol=1e-4)
        # A pixel may only flip where the two agree on a probability at the threshold.
        flipped = prediction.mask != (prob > 0.5)
        assert np.all(np.abs(prob[flipped] - 0.5) < 1e-4)


class _Unfolded:
    """The trainable form as it was before folding: the module's own forward."""

    def __init__(self, model) -> None:
        self.model = model

    def mask_logits(self, images, prompts):
        return self.model.net.eval()(to_batch(images, "cpu")[0], list(prompts))


def _finetune_loss(model, samples, folded: bool) -> torch.Tensor:
    """`reward_net.finetune`'s step loss through the folded network (what fine-tuning
    runs) or through the unfolded module (what it ran before)."""
    torch.manual_seed(0)
    reward_net = RewardNet(width=8).eval()
    for parameter in reward_net.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    consensus = {s.id: torch.rand(1, *s.image.shape[:2], generator=generator) for s in samples}
    anchors = {s.id: torch.full(s.image.shape[:2], 0.25) for s in samples}
    loss, _, _ = finetune_loss(model if folded else _Unfolded(model), reward_net, samples, "the {target}", consensus,
                               anchors, 32, 1.0, "cpu")
    return loss


def test_finetuning_step_through_the_folded_network_has_the_unfolded_loss_and_gradients(prompt_inputs):
    _, _, samples = prompt_inputs
    model = load_embedded()
    gradients = {}
    for folded in (True, False):
        model.net.zero_grad(set_to_none=True)
        loss = _finetune_loss(model, samples[:2], folded)
        loss.backward()
        gradients[folded] = (float(loss.detach()), {n: p.grad.clone() for n, p in model.net.named_parameters()})
    (folded_loss, folded_grads), (loss, grads) = gradients[True], gradients[False]
    assert folded_loss == pytest.approx(loss, rel=1e-6)
    assert set(folded_grads) == set(grads) and len(grads) > 40  # batch norm's scale and shift are trained too
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        np.testing.assert_allclose(folded_grads[name].numpy(), grad.numpy(), rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=name)


def test_default_config_ppo_settings_pass_the_check(tmp_path):
    config = load_config(ROOT / "configs" / "default.yaml")
    for experiment in (config.prompt_rl, config.postprocess_rl):
        ppo = experiment.ppo
        assert (ppo.n_steps * ppo.n_envs) % ppo.batch_size == 0
        assert experiment.total_timesteps >= ppo.n_steps * ppo.n_envs * 6  # enough updates for a reward trend
    result = run_cli("check", "-c", str(ROOT / "configs" / "default.yaml"), "--set", f"run.logs_dir={tmp_path}",
                     timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
