"""A stand-in for Sa2VA's released remote code, tiny enough for a CPU, that behaves like
it where the backend depends on it (read from bytedance/Sa2VA `projects/sa2va/hf/models*/`
`modeling_sa2va_chat.py`, `modeling_sa2va_qwen.py`, `sam2.py`; written here anew):

- `predict_forward(image=PIL, text=..., tokenizer=...)`; the Qwen flavours assert
  `processor is not None`; the older InternVL code casts the whole model to its
  `torch_dtype` on the first call, the newer casts its inputs.
- grounding pixels: the image resized to SAM2's square input, normalised; one fresh
  `get_sam2_embeddings` state per [SEG]; `language_embd_inference` decodes it and
  `propagate_in_video` (under `@torch.inference_mode()`) upsamples the low-res logits
  (image_size // 4) to image_size; predict_forward resizes those to H x W and thresholds.
- the state is a mutable dict; image features are computed lazily on the first decode
  and kept in `state["cached_features"]`; a state that has been decoded once fails a
  second time with track_step's AssertionError (previous mask logits without points).
- `inject_language_embd(fresh_state, [embedding])` returns the low-res logits with
  gradients; the mask decoder has the real heads, so that `iou_prediction_head` and
  `pred_obj_score_head` never get a gradient (argmax, hard threshold), mask token 0's
  hypernetwork is sliced away in multimask mode, and `conv_s0`/`conv_s1` sit on the
  image-feature path.
- bf16 weights, as loaded with torch_dtype=torch.bfloat16.

Sizes are ~1/8 of the real ones (SAM2 input 128 instead of 1024).
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGE_SIZE, SAM_DIM, LLM_DIM = 128, 32, 24
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The loader seam counts loads: one model per worker is a claim the tests check.
LOADS: list[str] = []


class MLP(nn.Module):
    def __init__(self, din: int, hidden: int, dout: int, layers: int, sigmoid: bool = False) -> None:
        super().__init__()
        sizes = [din] + [hidden] * (layers - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.sigmoid = sigmoid

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return torch.sigmoid(x) if self.sigmoid else x


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(1, keepdim=True) + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ImageEncoder(nn.Module):
    """Three feature levels at strides 4, 8, 16, with positional encodings."""

    def __init__(self) -> None:
        super().__init__()
        self.s4 = nn.Conv2d(3, SAM_DIM, 4, stride=4)
        self.s8 = nn.Conv2d(SAM_DIM, SAM_DIM, 2, stride=2)
        self.s16 = nn.Conv2d(SAM_DIM, SAM_DIM, 2, stride=2)

    def forward(self, x):
        l0 = self.s4(x)
        l1 = self.s8(F.gelu(l0))
        l2 = self.s16(F.gelu(l1))
        levels = [l0, l1, l2]
        return {"vision_features": l2, "backbone_fpn": levels, "vision_pos_enc": [_position(t) for t in levels]}


def _position(t: torch.Tensor) -> torch.Tensor:
    h, w = t.shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    freqs = torch.arange(1, t.shape[1] // 4 + 1, dtype=torch.float32)[:, None, None]
    pe = torch.cat([torch.sin(freqs * ys), torch.cos(freqs * ys), torch.sin(freqs * xs), torch.cos(freqs * xs)])
    return pe[None].to(device=t.device, dtype=t.dtype)


class PromptEncoder(nn.Module):
    """No points, no boxes, no mask: a padding point and the "no mask" embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.not_a_point_embed = nn.Embedding(1, SAM_DIM)
        self.no_mask_embed = nn.Embedding(1, SAM_DIM)
        self.embed = IMAGE_SIZE // 16

    def get_dense_pe(self):
        return _position(torch.zeros(1, SAM_DIM, self.embed, self.embed, dtype=self.no_mask_embed.weight.dtype,
                                     device=self.no_mask_embed.weight.device))

    def forward(self, batch: int):
        sparse = self.not_a_point_embed.weight[None].expand(batch, -1, -1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, self.embed, self.embed)
        return sparse, dense


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(SAM_DIM, SAM_DIM) for _ in range(4))

    def forward(self, q, k, v):
        weights = torch.softmax(self.q(q) @ self.k(k).transpose(1, 2) / SAM_DIM**0.5, dim=-1)
        return self.out(weights @ self.v(v))


class TwoWayTransformer(nn.Module):
    """Tokens attend to each other and to the image, the image to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.token_to_image, self.image_to_token = Attention(), Attention(), Attention()

    def forward(self, image, image_pe, tokens):
        keys, pos = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        tokens = tokens + self.self_attn(tokens, tokens, tokens)
        tokens = tokens + self.token_to_image(tokens, keys + pos, keys)
        keys = keys + self.image_to_token(keys + pos, tokens, tokens)
        return tokens, keys


class MaskDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        d, masks = SAM_DIM, 4
        self.transformer = TwoWayTransformer()
        self.iou_token, self.mask_tokens, self.obj_score_token = nn.Embedding(1, d), nn.Embedding(masks, d), nn.Embedding(1, d)
        self.output_upscaling = nn.Sequential(nn.ConvTranspose2d(d, d // 4, 2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
                                              nn.ConvTranspose2d(d // 4, d // 8, 2, stride=2), nn.GELU())
        self.conv_s0, self.conv_s1 = nn.Conv2d(d, d // 8, 1), nn.Conv2d(d, d // 4, 1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(masks))
        self.iou_prediction_head = MLP(d, d, masks, 3, sigmoid=True)
        self.pred_obj_score_head = MLP(d, d, 1, 3)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output,
                repeat_image, high_res_features):
        b = sparse_prompt_embeddings.shape[0]
        own = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([own[None].expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        dtype = image_pe.dtype  # as the real decoder: everything at the positional encoding's dtype
        hs, keys = self.transformer(src.to(dtype), image_pe, tokens.to(dtype))
        c, h, w = src.shape[1:]
        src = keys.transpose(1, 2).reshape(b, c, h, w)
        up1, norm, act1, up2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = act2(up2(act1(norm(up1(src) + feat_s1))) + feat_s0)
        hyper = torch.stack([mlp(hs[:, 2 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ upscaled.flatten(2)).reshape(b, -1, *upscaled.shape[-2:])
        iou = self.iou_prediction_head(hs[:, 1])
        object_score_logits = self.pred_obj_score_head(hs[:, 0])
        if multimask_output:
            return masks[:, 1:], iou[:, 1:], hs[:, 3:6], object_score_logits
        return masks[:, :1], iou[:, :1], hs[:, 2:3], object_score_logits


class VideoPredictor(nn.Module):
    """SAM2VideoPredictor's state machine for language prompts on one image."""

    def __init__(self) -> None:
        super().__init__()
        self.image_size, self.hidden_dim = IMAGE_SIZE, SAM_DIM
        self.image_encoder, self.sam_prompt_encoder, self.sam_mask_decoder = ImageEncoder(), PromptEncoder(), MaskDecoder()
        self.no_mem_embed = nn.Parameter(torch.randn(1, SAM_DIM, 1, 1) * 0.02)
        self.obj_ptr_proj = nn.Linear(SAM_DIM, SAM_DIM)
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, SAM_DIM))
        self.multimask_output_in_sam, self.multimask_min_pt_num, self.multimask_max_pt_num = True, 0, 1

    def _use_multimask(self, is_init_cond_frame, point_inputs):
        points = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return self.multimask_output_in_sam and is_init_cond_frame and \
            self.multimask_min_pt_num <= points <= self.multimask_max_pt_num

    def forward_image(self, image):
        out = self.image_encoder(image)
        out["backbone_fpn"][0] = self.sam_mask_decoder.conv_s0(out["backbone_fpn"][0])
        out["backbone_fpn"][1] = self.sam_mask_decoder.conv_s1(out["backbone_fpn"][1])
        return out

    def init_state(self, images):
        device = self.no_mem_embed.device
        return {"images": images, "num_frames": len(images), "video_height": self.image_size,
                "video_width": self.image_size, "device": device, "storage_device": device, "cached_features": {},
                "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
                "output_dict": {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}, "output_dict_per_obj": {},
                "temp_output_dict_per_obj": {}, "tracking_has_started": False, "frames_already_tracked": {}}

    def _get_image_feature(self, state, frame_idx):
        image, backbone = state["cached_features"].get(frame_idx, (None, None))
        if backbone is None:
            image = state["images"][frame_idx].to(state["device"]).unsqueeze(0)
            backbone = self.forward_image(image)
            state["cached_features"] = {frame_idx: (image, backbone)}
        return image, backbone

    def _obj_idx(self, state, obj_id):
        if obj_id in state["obj_id_to_idx"]:
            return state["obj_id_to_idx"][obj_id]
        if state["tracking_has_started"]:
            raise RuntimeError(f"Cannot add new object id {obj_id} after tracking starts.")
        idx = len(state["obj_id_to_idx"])
        state["obj_id_to_idx"][obj_id], state["obj_idx_to_id"][idx] = idx, obj_id
        state["obj_ids"] = list(state["obj_id_to_idx"])
        state["output_dict_per_obj"][idx] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        state["temp_output_dict_per_obj"][idx] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        return idx

    def add_language_embd(self, state, frame_idx, obj_id, language_embd, inference=False):
        idx = self._obj_idx(state, obj_id)
        is_init_cond_frame = frame_idx not in state["frames_already_tracked"]
        previous = state["temp_output_dict_per_obj"][idx]["cond_frame_outputs"].get(frame_idx) or \
            state["output_dict_per_obj"][idx]["cond_frame_outputs"].get(frame_idx)
        prev_logits = None if previous is None else previous["pred_masks"].clamp(-32.0, 32.0)
        out = self.track_step(state, frame_idx, is_init_cond_frame, point_inputs=None, mask_inputs=None,
                              prev_sam_mask_logits=prev_logits, language_embd=language_embd)
        state["temp_output_dict_per_obj"][idx]["cond_frame_outputs"][frame_idx] = out
        return frame_idx, state["obj_ids"], out["pred_masks"]

    def track_step(self, state, frame_idx, is_init_cond_frame, point_inputs, mask_inputs, prev_sam_mask_logits,
                   language_embd):
        _, backbone = self._get_image_feature(state, frame_idx)
        features = backbone["backbone_fpn"]
        pix = features[2] + self.no_mem_embed if is_init_cond_frame else features[2]
        if prev_sam_mask_logits is not None:
            # The guard the real track_step has: earlier mask logits only come with clicks.
            assert point_inputs is not None and mask_inputs is None
        multimask = self._use_multimask(is_init_cond_frame, point_inputs)
        low_res, obj_ptr = self._forward_sam_heads(pix, features[:2], multimask, language_embd)
        return {"pred_masks": low_res, "obj_ptr": obj_ptr}

    def _forward_sam_heads(self, backbone_features, high_res_features, multimask_output, language_embd):
        batch = backbone_features.shape[0]
        sparse, dense = self.sam_prompt_encoder(batch)
        sparse = torch.cat([sparse, language_embd], dim=1)
        masks, ious, tokens, object_score_logits = self.sam_mask_decoder(
            backbone_features, self.sam_prompt_encoder.get_dense_pe(), sparse, dense, multimask_output,
            repeat_image=False, high_res_features=high_res_features)
        masks = masks.float()
        best = torch.argmax(ious, dim=-1) if multimask_output else torch.zeros(batch, dtype=torch.long)
        rows = torch.arange(batch)
        low_res = masks[rows, best].unsqueeze(1)
        appearing = (object_score_logits > 0).float()  # hard: the score head gets no gradient
        obj_ptr = appearing * self.obj_ptr_proj(tokens[rows, best]) + (1 - appearing) * self.no_obj_ptr
        return low_res, obj_ptr

    @torch.inference_mode()
    def propagate_in_video(self, state):
        state["tracking_has_started"] = True
        for idx, temp in state["temp_output_dict_per_obj"].items():
            state["output_dict_per_obj"][idx]["cond_frame_outputs"].update(temp["cond_frame_outputs"])
            temp["cond_frame_outputs"].clear()
        frames = sorted({f for d in state["output_dict_per_obj"].values() for f in d["cond_frame_outputs"]})
        if not frames:
            raise RuntimeError("No points are provided; please add points first")
        for frame_idx in frames:
            low = torch.cat([d["cond_frame_outputs"][frame_idx]["pred_masks"] for d in state["output_dict_per_obj"].values()])
            state["frames_already_tracked"][frame_idx] = {"reverse": False}
            size = (state["video_height"], state["video_width"])
            yield frame_idx, state["obj_ids"], F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)


class SAM2(nn.Module):
    """The grounding encoder: `sam2_model` and the wrapper methods Sa2VA calls."""

    def __init__(self) -> None:
        super().__init__()
        self.sam2_model = VideoPredictor()
        self.hidden_dim = SAM_DIM

    def preprocess_image(self, image, dtype=torch.bfloat16):
        image = image / 255.0
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=image.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=image.device)[:, None, None]
        return (image - mean) / std

    def get_sam2_embeddings(self, images):
        return self.sam2_model.init_state(images)

    def inject_language_embd(self, inference_state, language_embd):
        frames = []
        for frame_idx, per_object in enumerate(language_embd):
            logits = [self.sam2_model.add_language_embd(inference_state, frame_idx, obj + 100, emb[None][None])[2]
                      for obj, emb in enumerate(per_object)]
            frames.append(torch.cat(logits, dim=1))
        return torch.cat(frames, dim=0)

    def language_embd_inference(self, inference_state, language_embd):
        device = inference_state["device"]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for frame_idx, per_object in enumerate(language_embd):
                for obj, emb in enumerate(per_object):
                    self.sam2_model.add_language_embd(inference_state, frame_idx, obj + 100, emb[None][None], inference=True)
            return torch.cat([masks for _, _, masks in self.sam2_model.propagate_in_video(inference_state)], dim=0)


class StandInSa2VA(nn.Module):
    """`flavour`: "internvl_old" (magic-research: casts the model on the first call),
    "internvl" (bytedance: casts the inputs), "qwen" (asserts a processor)."""

    def __init__(self, flavour: str = "internvl", dtype=torch.bfloat16, silent_on=("nothing",), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.flavour, self.silent_on = flavour, tuple(silent_on)
        self.vision_model = nn.Linear(12, LLM_DIM)
        self.language_model = nn.Embedding(512, LLM_DIM)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(LLM_DIM, LLM_DIM), nn.ReLU(inplace=True),
                                             nn.Linear(LLM_DIM, SAM_DIM), nn.Dropout(0.0))
        self.grounding_encoder = SAM2()
        self.torch_dtype = dtype
        self.init_prediction_config = False
        self.generate_calls = 0
        self.to(dtype)

    def _generate(self, pixels: torch.Tensor, text: str) -> tuple[str, torch.Tensor]:
        """The answer and the hidden states of its [SEG] tokens (none when it has none)."""
        self.generate_calls += 1
        if any(word in text for word in self.silent_on):
            return "I cannot find it.", torch.zeros(0, LLM_DIM, dtype=self.torch_dtype)
        words = torch.tensor([zlib.crc32(w.encode()) % 512 for w in text.lower().split()])
        pooled = F.adaptive_avg_pool2d(pixels, 2).flatten().to(self.vision_model.weight.dtype)
        hidden = torch.tanh(self.language_model(words).mean(0) + self.vision_model(pooled))
        return "Sure, [SEG].", hidden[None]

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        if self.flavour == "qwen":
            assert processor is not None
        elif not self.init_prediction_config:
            assert tokenizer
            if self.flavour == "internvl_old":
                self.to(self.torch_dtype)
            self.init_prediction_config = True
        square = np.array(image.resize((IMAGE_SIZE, IMAGE_SIZE)))
        g = torch.from_numpy(square).permute(2, 0, 1).contiguous().to(self.torch_dtype)
        g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(g)]).to(self.torch_dtype)
        answer, seg_hidden_states = self._generate(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1),
                                                   text)
        masks_out = []
        for seg in self.text_hidden_fcs(seg_hidden_states):
            state = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(state, [seg[None]])
            w, h = image.size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            masks_out.append((masks.sigmoid() > 0.5).cpu().numpy())
        return {"prediction": answer, "prediction_masks": masks_out}


class StandInTokenizer:
    def convert_tokens_to_ids(self, token: str) -> int:
        return zlib.crc32(token.encode()) % 512


class StandInProcessor:
    def __init__(self) -> None:
        self.tokenizer = StandInTokenizer()


def load_standin(path: Path, family: str):
    """The loader seam (`SA2VA_TUI_SA2VA_LOADER=sa2va_standin:load_standin`): the flavour
    the family's code has, and options from the checkpoint's `standin` key."""
    options = json.loads((Path(path) / "config.json").read_text()).get("standin", {})
    flavour = {"internvl2_5": options.get("internvl_flavour", "internvl_old"), "internvl3": "internvl"}.get(family, "qwen")
    LOADS.append(str(path))
    model = StandInSa2VA(flavour, silent_on=options.get("silent_on", ("nothing",))).eval()
    if flavour == "qwen":
        processor = StandInProcessor()
        return model, processor.tokenizer, processor
    return model, StandInTokenizer(), None


def write_checkpoint(folder: Path, family: str = "internvl2_5", **standin) -> Path:
    """A checkpoint folder whose config.json reads like the released ones' for `family`."""
    folder.mkdir(parents=True, exist_ok=True)
    internvl = {"architectures": ["Sa2VAChatModel"], "model_type": "sa2va_chat",
                "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                             "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}}
    qwen = {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat",
            "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                         "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen"}}
    configs = {
        "internvl2_5": {**internvl, "llm_config": {"architectures": ["InternLM2ForCausalLM"], "num_hidden_layers": 32}},
        "internvl3": {**internvl, "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
                                                 "num_hidden_layers": 28}},
        "qwen2_5_vl": {**qwen, "vision_config": {"model_type": "qwen2_5_vl"}},
        "qwen3_vl": {**qwen, "vision_config": {"model_type": "qwen3_vl"}, "text_config": {"model_type": "qwen3_vl_text"}},
    }
    (folder / "config.json").write_text(json.dumps({**configs[family], "standin": standin}))
    (folder / "model.safetensors").write_bytes(b"stand-in weights")
    return folder
