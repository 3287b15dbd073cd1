"""The reward-network experiment's two rows of the evaluation table: the fine-tuned
segmenter with the default prompt, and reward-network reranking."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from experiments.datasets import Sample, render_prompt
from experiments.metrics import row_from_masks
from experiments.reward.network import RewardNet, consensus_map, images_to_tensor, load_reward_net, resize_maps
from sa2va_contract.evaluation import row_label
from sa2va_contract.layout import BEST_REWARD_NET, FINETUNED_SEGMENTER


#: Post-processing choices that reranking considers for every candidate prompt's mask.
RERANK_OPERATIONS = ((), ("fill_holes",), ("drop_small",), ("bridge_gaps",), ("close",), ("drop_small", "fill_holes"))


def rerank(reward_net: RewardNet, samples: Sequence[Sample], segmenter, templates: Sequence[str], query: str,
           settings, size: int) -> list[np.ndarray]:
    """Per image, of every candidate prompt times a few post-processing choices, the
    mask the reward network scores highest. No label is read."""
    from experiments.postprocess import apply_sequence

    chosen = []
    for sample in samples:
        predictions = [segmenter.predict(sample, template) for template in templates]
        candidates = [apply_sequence(p.mask, p.prob, ops, settings) for p in predictions for ops in RERANK_OPERATIONS]
        n = len(candidates)
        masks = resize_maps(torch.from_numpy(np.stack(candidates)).float().unsqueeze(1), size)
        images = resize_maps(images_to_tensor([sample.image]), size).expand(n, -1, -1, -1)
        agreed = resize_maps(consensus_map([p.mask for p in predictions]).unsqueeze(0), size).expand(n, -1, -1, -1)
        with torch.no_grad():
            scores = reward_net(images, masks, agreed, [render_prompt(query, sample)] * n)
        chosen.append(candidates[int(torch.argmax(scores))])
    return chosen


def evaluation_rows(config, exp_dir: Path, samples: Sequence[Sample], segmenter,
                    experiment=None) -> tuple[list, dict[str, str]]:
    """The two rows one reward-network experiment (its folder `exp_dir`, its config
    `experiment`, by default the config's `reward_net`) gives: the fine-tuned
    segmenter with the default prompt, and reward-network reranking."""
    from experiments.backends import cache_dir_for, make_trainable
    from experiments.backends.cache import CachedSegmenter
    from experiments.postprocess import OpSettings

    exp_dir = Path(exp_dir)
    experiment = experiment or config.reward_net
    ids, truths = [s.id for s in samples], [s.mask for s in samples]
    template = config.backend.prompts[config.backend.default_prompt]
    rows, missing = [], {}
    tuned_path = exp_dir / FINETUNED_SEGMENTER
    tuned_model = _loaded(lambda: make_trainable(config, finetuned=tuned_path, base=segmenter), tuned_path,
                          "finetuned", missing)
    if tuned_model is not None:
        tuned = CachedSegmenter(tuned_model, cache_dir_for(config))
        masks = [tuned.predict(s, template).mask for s in samples]
        rows.append(row_from_masks("finetuned", row_label("finetuned"), "model", ids, masks, truths,
                                   source=str(tuned_path)))
    net_path = exp_dir / BEST_REWARD_NET
    net = _loaded(lambda: load_reward_net(net_path), net_path, "reward_rerank", missing)
    if net is not None:
        settings = OpSettings.of(config.postprocess_rl)
        masks = rerank(net, samples, segmenter, config.backend.prompts, template, settings,
                       experiment.reward.input_size)
        rows.append(row_from_masks("reward_rerank", row_label("reward_rerank"), "policy", ids, masks, truths,
                                   source=str(net_path)))
    return rows, missing


def _loaded(load, path: Path, row: str, missing: dict[str, str]):
    """What `load` makes of the file at `path`; None, with the row's reason recorded in
    `missing`, when it is absent or will not load (truncated, not ours)."""
    from experiments.checkpoints import damage_reason

    if not path.is_file():
        missing[row] = f"no {path.name} in {path.parent}"
        return None
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - a damaged file costs its row, not the evaluation
        missing[row] = f"{path}: {damage_reason(err)}"
        return None
