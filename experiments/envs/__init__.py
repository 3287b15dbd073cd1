"""The two Gymnasium environments of the PPO experiments, registered by id:

- `Sa2VA/PromptSelect-v0` (`PromptSelectEnv`): choose a candidate prompt;
- `Sa2VA/PostProcess-v0` (`PostProcessEnv`): edit the segmenter's mask.

Both read per-sample tables built once in the "caching masks" phase
(`build_prompt_table`, `build_postprocess_table`), so that a step is cheap.
`gymnasium.make(ID, table=..., ...)` passes its keyword arguments to the class.
"""

from __future__ import annotations

import gymnasium as gym

from experiments.envs.postprocess import PostProcessEnv, effective_operations, prefill_first_operations
from experiments.envs.prompt import PromptSelectEnv
from experiments.envs.tables import PostprocessTable, PromptTable, build_postprocess_table, build_prompt_table

PROMPT_ENV_ID = "Sa2VA/PromptSelect-v0"
POSTPROCESS_ENV_ID = "Sa2VA/PostProcess-v0"

for _id, _entry in ((PROMPT_ENV_ID, "experiments.envs.prompt:PromptSelectEnv"),
                    (POSTPROCESS_ENV_ID, "experiments.envs.postprocess:PostProcessEnv")):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry)

__all__ = [
    "POSTPROCESS_ENV_ID",
    "PROMPT_ENV_ID",
    "PostProcessEnv",
    "PostprocessTable",
    "PromptSelectEnv",
    "PromptTable",
    "build_postprocess_table",
    "build_prompt_table",
    "effective_operations",
    "prefill_first_operations",
]
