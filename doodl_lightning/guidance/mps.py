"""MPS guidance: the Multi-dimensional Preference Score (Zhang et al., CVPR 2024; Kwai-Kolors/MPS), a CLIP-H whose
image tokens attend, through condition-aware cross-attention, only to the prompt tokens that match a preference
condition; scored as ``eval_overall_mps_on_hpdv2.infer_one_sample`` does."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Guidance
from .clip_processor import CLIPPreprocess
from .loading import load_into, load_state_dict_file, one_line
from .pickscore import need_prompts
from ..precision import at_least_float32, to_module_dtype

__all__ = ["MPSGuidance", "MPSCrossModel", "map_mps_keys", "MPS_CONDITION"]

# The condition of the released "overall" model (the README and both eval scripts)
MPS_CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
                 "instance, texture, quantity, attributes, position, number, location, word, things.")

# MPS's Cross_model names (cross_modeling.py: Residual(CrossAttention), Residual(ParallelTransformerBlock)) -> ours
_CROSS_KEYS = {
    "0.fn.norm.weight": "attend_prompt.norm.weight", "0.fn.norm.bias": "attend_prompt.norm.bias",
    "0.fn.to_q.weight": "attend_prompt.q.weight", "0.fn.to_kv.weight": "attend_prompt.kv.weight",
    "0.fn.to_out.weight": "attend_prompt.out.weight", "0.fn.ff.0.weight": "attend_prompt.ff_in.weight",
    "0.fn.ff.2.weight": "attend_prompt.ff_out.weight",
    "1.fn.norm.weight": "attend_image.norm.weight", "1.fn.norm.bias": "attend_image.norm.bias",
    "1.fn.rotary_emb.inv_freq": "attend_image.inv_freq", "1.fn.fused_attn_ff_proj.weight": "attend_image.qkv_ff.weight",
    "1.fn.attn_out.weight": "attend_image.attn_out.weight", "1.fn.ff_out.1.weight": "attend_image.ff_out.weight",
}
_CROSS_KEY = re.compile(r"cross_model\.layers\.(\d+)\.(.+)")
# transformers 4.x saved CLIP's position_ids as persistent buffers; they are arange and rebuilt by the model
_STALE = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")


def map_mps_keys(state: dict[str, Tensor], path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An MPS state dict -> (CLIPModel's state dict, ``MPSCrossModel``'s), each key renamed explicitly."""
    clip, cross, unknown = {}, {}, []
    for key, value in state.items():
        if key in _STALE:
            continue
        match = _CROSS_KEY.fullmatch(key)
        if key.startswith("model."):
            clip[key[len("model."):]] = value
        elif match and match.group(2) in _CROSS_KEYS:
            cross[f"layers.{match.group(1)}.{_CROSS_KEYS[match.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"MPS checkpoint {path}: keys outside MPS's CLIPModel ({len(unknown)}): "
                         f"{', '.join(unknown[:4])}; expected model.* (the CLIP) and cross_model.layers.*")
    if not cross:
        raise ValueError(f"MPS checkpoint {path} has no cross_model.* weights: is it the MPS checkpoint rather than a "
                         "plain CLIP?")
    return clip, cross


class _LayerNorm(nn.Module):
    """LayerNorm with a learnt gain and a fixed (stored, zero) bias, as MPS's."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


def _swiglu(x: Tensor) -> Tensor:
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value


def _rotate(t: Tensor, angles: Tensor) -> Tensor:
    """Rotary embedding (RoFormer) with the two halves of each vector as the rotated pairs."""
    first, second = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


class _AttendPrompt(nn.Module):
    """Image tokens (queries, ``heads`` heads) attend to the prompt's projected tokens through one shared key / value
    head (multi-query), masked to the condition-relevant tokens; a SwiGLU feed-forward of the same normed input
    runs in parallel; residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = _LayerNorm(dim)
        self.q = nn.Linear(dim, heads * dim_head, bias=False)
        self.kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_in = nn.Linear(dim, 2 * ff_inner, bias=False)
        self.ff_out = nn.Linear(ff_inner, dim, bias=False)

    def forward(self, x: Tensor, prompt: Tensor, mask: Tensor) -> Tensor:
        h = self.norm(x)
        q = self.q(h).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) * self.dim_head ** -0.5
        k, v = self.kv(prompt).chunk(2, dim=-1)  # the prompt is not normed (MPS's norm_context=False)
        weights = torch.softmax(q @ k.unsqueeze(1).transpose(-1, -2) + mask.unsqueeze(1), dim=-1)
        attended = (weights @ v.unsqueeze(1)).transpose(1, 2).flatten(2)
        return x + self.out(attended) + self.ff_out(_swiglu(self.ff_in(h)))


class _AttendImage(nn.Module):
    """PaLM's parallel block over the image tokens: one fused projection to multi-query attention (rotary positions)
    and a SwiGLU feed-forward, summed; residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.splits = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)
        self.norm = _LayerNorm(dim)
        self.qkv_ff = nn.Linear(dim, sum(self.splits), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Linear(ff_inner, dim, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v, ff = self.qkv_ff(h).split(self.splits, dim=-1)
        q = q.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
        angles = torch.outer(torch.arange(x.shape[1], device=x.device, dtype=self.inv_freq.dtype), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1).to(x.dtype)
        q, k = _rotate(q, angles) * self.dim_head ** -0.5, _rotate(k, angles)
        weights = torch.softmax(q @ k.unsqueeze(1).transpose(-1, -2), dim=-1)
        attended = (weights @ v.unsqueeze(1)).transpose(1, 2).flatten(2)
        return x + self.attn_out(attended) + self.ff_out(_swiglu(ff))


class _CrossLayer(nn.Module):
    def __init__(self, *sizes: int):
        super().__init__()
        self.attend_prompt = _AttendPrompt(*sizes)
        self.attend_image = _AttendImage(*sizes)


class MPSCrossModel(nn.Module):
    """MPS's condition-aware fusion: ``layers`` x (image tokens attend to the masked prompt, then to each other).
    Sizes come from the checkpoint (the released model: dim 1024, 4 layers, 16 heads of 64, feed-forward 4096)."""

    def __init__(self, dim: int, layers: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.layers = nn.ModuleList(_CrossLayer(dim, heads, dim_head, ff_inner) for _ in range(layers))

    @classmethod
    def sized_like(cls, state: dict[str, Tensor], path) -> "MPSCrossModel":
        try:
            inner, dim = state["layers.0.attend_prompt.q.weight"].shape
            dim_head = state["layers.0.attend_prompt.kv.weight"].shape[0] // 2
            ff_inner = state["layers.0.attend_prompt.ff_in.weight"].shape[0] // 2
        except KeyError as e:
            raise ValueError(f"MPS checkpoint {path}: cross_model.layers.0 lacks {e.args[0]}") from None
        layers = 1 + max(int(k.split(".")[1]) for k in state)
        return cls(int(dim), layers, int(inner) // int(dim_head), int(dim_head), int(ff_inner))

    def forward(self, image: Tensor, prompt: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            image = layer.attend_image(layer.attend_prompt(image, prompt, mask))
        return image


def _require_dir(path: str | None, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    return folder


def _load_clip_parts(folder: Path):
    """(CLIPModel from the folder's config.json, tokenizer, image processor): laion/CLIP-ViT-H-14-laion2B-s32B-b79K's
    config and processor files (its weights are not read: MPS's file holds the whole fine-tuned CLIP)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

    for need, hint in (("config.json", "the CLIP config"), ("preprocessor_config.json", "the CLIP image processor")):
        if not (folder / need).is_file():
            raise FileNotFoundError(f"MPS processor folder {folder} has no {need} ({hint})")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise FileNotFoundError(f"MPS processor folder {folder} has no CLIP tokenizer files "
                                "(tokenizer.json, or vocab.json + merges.txt)")
    try:
        config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"MPS processor folder {folder}: could not load a CLIP config, tokenizer and image processor: "
                         f"{one_line(e, 240)}") from None
    if tokenizer.pad_token_id is None:
        raise ValueError(f"MPS processor folder {folder}: its tokenizer has no pad token (MPS pads to max_length)")
    config._attn_implementation = "eager"  # plain softmax attention: float64 and gradients everywhere
    return CLIPModel(config), tokenizer, image_processor


class MPSGuidance(Guidance):
    """Loss = -MPS: ``logit_scale.exp() * cos(prompt EOS embedding, fused image CLS token)``.

    Weights: MPS's ``MPS_overall_checkpoint.pth`` (Google Drive link in Kwai-Kolors/MPS's README; CLIP ViT-H/14 +
    the cross model). That file is a PICKLED nn.Module (``torch.save(model)``), which is never unpickled here:
    convert it once, where you trust it, to a state dict: with the MPS repository on ``sys.path``,
    ``safetensors.torch.save_file({k: v.contiguous() for k, v in torch.load(path, weights_only=False)
    .state_dict().items()}, "MPS_overall.safetensors")``; ``checkpoint`` is that file (or a weights-only torch
    state dict with the same keys: ``model.*`` the CLIP, ``cross_model.*``). ``processor``: a local folder of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` holding ``config.json`` (the CLIP architecture),
    ``preprocessor_config.json`` and the tokenizer files. The model computes in float32 unless the trainer casts it.

    As ``infer_one_sample`` (eval_overall_mps_on_hpdv2.py / _on_imagereward.py) scores: prompt and ``condition``
    tokenised to ``model_max_length`` with max-length padding and no attention mask; every text token's final state
    projected (``text_projection``), the prompt's EOS state too; every image token's encoder output projected
    (``visual_projection``, no post-layernorm); similarity of each prompt token to its best-matching condition token,
    divided by the largest, kept where above ``condition_threshold`` (0.3 in the evaluations); the image tokens
    attend to the kept prompt tokens through ``MPSCrossModel``; its first (CLS) token against the EOS embedding.
    The reference scores one image at a time, so its normalising maximum is each item's own; it is here too.
    Image side: the CLIP processor rebuilt differentiably (``CLIPPreprocess``, as PickScore's: shortest side to 224,
    bicubic antialiased as PIL, centre crop 224, CLIP mean / std). Prompt-side tensors are cached per prompt.
    """

    default_name = "mps"

    def __init__(self, checkpoint: str | None = None, processor: str | None = None, condition: str = MPS_CONDITION,
                 condition_threshold: float = 0.3, weight: float = 1.0, name: str | None = None):
        if not checkpoint:
            raise ValueError("MPSGuidance needs checkpoint: MPS_overall_checkpoint.pth converted to a state dict "
                             "(see MPSGuidance's docstring)")
        if not processor:
            raise ValueError("MPSGuidance needs processor: a local folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                             "(config.json, preprocessor_config.json, tokenizer files)")
        if not math.isfinite(float(condition_threshold)):
            raise ValueError(f"MPSGuidance: condition_threshold must be a finite number, got {condition_threshold}")
        folder = _require_dir(processor, "MPS processor folder")
        try:
            state = load_state_dict_file(checkpoint, "MPS checkpoint")
        except ValueError as e:
            raise ValueError(f"{e}; MPS_overall_checkpoint.pth is a pickled model: convert it once to a state dict "
                             "as MPSGuidance's docstring shows") from None
        clip_state, cross_state = map_mps_keys(state, checkpoint)
        super().__init__(weight, name)
        clip, self.tokenizer, image_processor = _load_clip_parts(folder)
        load_into(clip, clip_state, checkpoint, "MPS checkpoint (its model.* part)")
        self.clip = clip.eval()
        cross = MPSCrossModel.sized_like(cross_state, checkpoint)
        load_into(cross, cross_state, checkpoint, "MPS checkpoint (its cross_model.* part, after its key map)")
        self.cross = cross.eval()
        del state, clip_state, cross_state
        self.condition = str(condition)
        self.condition_threshold = float(condition_threshold)
        self.max_length = int(self.tokenizer.model_max_length)
        self.pixels = CLIPPreprocess(image_processor, f"MPS processor {folder}",
                                     int(self.clip.config.vision_config.image_size), model="the CLIP")
        self._prompt_cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> the CLIP processor's pixel_values (N, 3, S, S), differentiably."""
        return self.pixels(images)

    def _text_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(every token's projected final state (B, L, D), the projected EOS state (B, D)), no attention mask."""
        device = self.clip.logit_scale.device
        ids = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                             return_tensors="pt")["input_ids"].to(device)
        out = self.clip.text_model(input_ids=ids)
        return self.clip.text_projection(out.last_hidden_state), self.clip.text_projection(out.pooler_output)

    @torch.no_grad()
    def prompt_side(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Per prompt: (projected tokens (N, L, D), EOS embedding (N, D), additive mask (N, 1, L): 0 where the token
        matches the condition above the threshold, -inf elsewhere), cached per prompt."""
        todo = sorted({p for p in prompts if p not in self._prompt_cache})
        if todo:
            tokens, eos = self._text_tokens(todo)
            condition, _ = self._text_tokens([self.condition])
            # each prompt token's best match among the condition's tokens, over the item's own largest
            best = torch.einsum("bid,jd->bji", tokens, condition[0]).amax(dim=1)
            best = best / best.amax(dim=-1, keepdim=True)
            mask = torch.zeros_like(best).masked_fill(~(best > self.condition_threshold), float("-inf"))
            self._prompt_cache.update((p, (t, e, m.unsqueeze(0))) for p, t, e, m in zip(todo, tokens, eos, mask))
        device = self.clip.logit_scale.device  # the cache may predate a move to another device
        return tuple(torch.stack([self._prompt_cache[p][i] for p in prompts]).to(device) for i in range(3))

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """MPS per item (N,), at least float32."""
        prompts = need_prompts(self.name, prompts, images.shape[0])
        tokens, eos, mask = self.prompt_side(prompts)
        pixels = to_module_dtype(self.preprocess(images), self.clip)
        image_tokens = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).last_hidden_state)
        fused = self.cross(image_tokens, tokens.to(image_tokens.dtype), mask.to(image_tokens.dtype))[:, 0]
        fused, eos = F.normalize(at_least_float32(fused), dim=-1), F.normalize(at_least_float32(eos), dim=-1)
        scale = at_least_float32(self.clip.logit_scale).exp()
        return scale.to(fused.dtype) * (fused * eos.to(fused.dtype)).sum(-1)

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item loss (N,): -MPS."""
        return -self.score(images, prompts)
