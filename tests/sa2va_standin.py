"""A stand-in for Sa2VA's remote code, small enough for a CPU, that keeps the real
structure the mask-decoder path relies on: `predict_forward` generates text (here a
deterministic function of the prompt), projects the [SEG] token's hidden state with
`text_hidden_fcs`, takes SAM2 image embeddings from
`grounding_encoder.get_sam2_embeddings`, decodes them with
`grounding_encoder.language_embd_inference` (SAM2's `sam_mask_decoder` inside), resizes
to the image and thresholds at 0.5, returning `(1, H, W)` boolean masks."""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, PROMPT_DIM, EMBED = 16, 8, 32


class TinySam2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Conv2d(3, PROMPT_DIM, 3, padding=1)
        self.sam_mask_decoder = nn.Sequential(nn.Conv2d(2 * PROMPT_DIM, 8, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(8, 1, 1))


class GroundingEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sam2_model = TinySam2()

    def get_sam2_embeddings(self, g_pixel_values: torch.Tensor) -> torch.Tensor:
        return self.sam2_model.image_encoder(g_pixel_values)

    def language_embd_inference(self, sam_states: torch.Tensor, language_embeddings: list) -> torch.Tensor:
        frames = []
        for embedding in language_embeddings:
            prompt = embedding.reshape(1, PROMPT_DIM, 1, 1).expand(-1, -1, *sam_states.shape[-2:])
            frames.append(self.sam2_model.sam_mask_decoder(torch.cat([sam_states, prompt], dim=1)))
        return torch.cat(frames, dim=0)  # (frames, 1, h, w) low-resolution logits


class StandInSa2VAModel(nn.Module):
    def __init__(self, silent_on: tuple[str, ...] = ("nothing",), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vision_model = nn.Linear(4, 4)  # stands for the frozen parts
        self.language_model = nn.Embedding(512, HIDDEN)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, PROMPT_DIM))
        self.grounding_encoder = GroundingEncoder()
        self.silent_on = silent_on

    def _generate(self, text: str) -> torch.Tensor | None:
        """The hidden states of the [SEG] tokens the model emits, none when it emits none."""
        if any(word in text for word in self.silent_on):
            return None
        token = torch.tensor([zlib.crc32(text.encode()) % 512])
        return self.language_model(token)  # (1, HIDDEN)

    def predict_forward(self, image, text, tokenizer):
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        g_pixel_values = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
        seg_hidden_states = self._generate(text)
        if seg_hidden_states is None:
            return {"prediction": "It is not there.", "prediction_masks": []}
        ret_masks = []
        for seg in self.text_hidden_fcs(seg_hidden_states):
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [seg.unsqueeze(0)])
            w, h = image.size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            ret_masks.append((masks.sigmoid() > 0.5).cpu().numpy())
        return {"prediction": "Sure, [SEG].", "prediction_masks": ret_masks}
