"""ImageReward guidance: BLIP ViT image encoder + BERT text encoder cross-attending to it + an MLP reward head."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .augment import normalize
from .base import Guidance
from .clip_processor import center_crop, resize_shortest_side
from .loading import load_into, load_state_dict_file, one_line, require_file
from .pickscore import need_prompts
from ..precision import at_least_float32, to_module_dtype

__all__ = ["ImageRewardGuidance", "ImageRewardModel", "map_image_reward_keys", "IMAGE_REWARD_MEAN",
           "IMAGE_REWARD_STD", "VITS"]

log = logging.getLogger(__name__)

# ImageReward.ImageReward: rewards = (mlp(features) - mean) / std.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's create_vit: patch 16, qkv bias, LayerNorm eps 1e-6, MLP ratio 4, exact GELU.
VITS = {
    "base": {"width": 768, "depth": 12, "heads": 12, "patch_size": 16, "image_size": 224},
    "large": {"width": 1024, "depth": 24, "heads": 16, "patch_size": 16, "image_size": 224},
}
_VIT_KEYS = {"width", "depth", "heads", "patch_size", "image_size", "mlp_dim"}
MLP_DIMS = (1024, 128, 64, 16, 1)  # ImageReward's MLP: Linears at 0, 2, 4, 6, 7 of ``layers``, no activations

# Original ``ImageReward.pt`` keys -> ImageRewardModel keys (first match wins; None = not used by the score).
KEY_MAP: list[tuple[str, str | None]] = [
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", r"vision.post_layernorm.\1"),
    (r"blip\.text_encoder\.embeddings\.position_ids", None),  # a buffer: arange(max_position_embeddings)
    (r"blip\.text_encoder\.((?:embeddings|encoder)\..+)", r"text.\1"),  # BLIP's med.py = transformers' BlipText
    (r"mlp\.layers\.(\d+)\.(weight|bias)", r"head.\1.\2"),
    (r"blip\.(vision_proj|text_proj)\.(weight|bias)", None),  # BLIP's contrastive projections: unused
]
# Keys under these prefixes must all map; others (training leftovers, loaded with strict=False upstream) are ignored.
_STRICT_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


def map_image_reward_keys(state: Mapping[str, Tensor],
                          path: str | Path = "ImageReward checkpoint") -> dict[str, Tensor]:
    """The original ``ImageReward.pt`` state dict (keys ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``mlp.layers.*``) renamed to ``ImageRewardModel``'s keys. Keys the score does not use (``blip.vision_proj``,
    ``blip.text_proj``, the ``position_ids`` buffer, anything outside the three encoders) are dropped; a key
    inside them that no rule maps is an error, as is a file with none of them."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, target in KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                if target is not None:
                    out[m.expand(target)] = value
                break
        else:
            if key.startswith(_STRICT_PREFIXES):
                unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward checkpoint {path}: keys not in ImageReward's layout ({len(unknown)}): "
                         f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    if not out:
        raise ValueError(f"ImageReward checkpoint {path}: expected ImageReward.pt's keys (blip.visual_encoder.*, "
                         f"blip.text_encoder.*, mlp.layers.*), got {', '.join(sorted(state)[:4])} ...")
    return out


class ImageRewardModel(nn.Module):
    """ImageReward's scoring path: ``vision`` (transformers ``BlipVisionModel`` = BLIP's ViT), ``text``
    (``BlipTextModel`` with cross-attention = BLIP's med.py ``BertModel``, no pooler) and ``head`` (the MLP).

    ``forward(pixel_values, input_ids, attention_mask)`` -> raw head output (N,), before ImageReward's
    mean / std normalisation: the text encoder's [CLS] state, cross-attending to all image tokens, through
    the MLP.
    """

    def __init__(self, vit: Mapping[str, int], text: Mapping):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        width = int(vit["width"])
        vision_cfg = BlipVisionConfig(
            hidden_size=width, intermediate_size=int(vit.get("mlp_dim", 4 * width)),
            num_hidden_layers=int(vit["depth"]), num_attention_heads=int(vit["heads"]),
            image_size=int(vit["image_size"]), patch_size=int(vit["patch_size"]), hidden_act="gelu",
            layer_norm_eps=1e-6, attention_dropout=0.0,
        )
        text_cfg = BlipTextConfig(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            encoder_hidden_size=width, intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]), num_attention_heads=int(text["num_attention_heads"]),
            max_position_embeddings=int(text["max_position_embeddings"]), hidden_act=text.get("hidden_act", "gelu"),
            layer_norm_eps=float(text.get("layer_norm_eps", 1e-12)), pad_token_id=int(text.get("pad_token_id", 0)),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=None, sep_token_id=None,
            is_decoder=True,  # transformers builds the cross-attention layers only for a decoder config ...
        )
        for cfg in (vision_cfg, text_cfg):
            cfg._attn_implementation = "eager"
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        dims = (int(text["hidden_size"]), *MLP_DIMS)
        linears = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
        # ImageReward's MLP: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear.
        self.head = nn.Sequential(linears[0], nn.Dropout(0.2), linears[1], nn.Dropout(0.2), linears[2],
                                  nn.Dropout(0.1), linears[3], linears[4])
        self.image_size = int(vit["image_size"])

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        # ... and it runs as an encoder (bidirectional self-attention), as med.py's mode='multimodal' does.
        # All image tokens are attended (ImageReward's image_atts are all ones).
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         is_decoder=False).last_hidden_state
        return self.head(text[:, 0]).squeeze(-1)


def _vit_spec(vit: str | Mapping[str, int]) -> dict[str, int]:
    if isinstance(vit, str):
        if vit not in VITS:
            raise ValueError(f"ImageRewardGuidance: unknown vit {vit!r}; use 'large' (ImageReward v1.0), 'base' "
                             "or a dict with width, depth, heads, patch_size, image_size")
        return dict(VITS[vit])
    spec = {str(k): int(v) for k, v in dict(vit).items()}
    missing = {"width", "depth", "heads", "patch_size", "image_size"} - set(spec)
    extra = set(spec) - _VIT_KEYS
    if missing or extra:
        raise ValueError(f"ImageRewardGuidance: vit dict needs width, depth, heads, patch_size, image_size "
                         f"(optional mlp_dim); missing {sorted(missing)}, unknown {sorted(extra)}")
    return spec


def _read_med_config(path: Path) -> dict:
    try:
        cfg = json.loads(require_file(path, "ImageReward med_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"ImageReward med_config {path}: not valid JSON: {one_line(e, 160)}") from None
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ValueError(f"ImageReward med_config {path}: a BERT config needs {', '.join(missing)}")
    if not cfg.get("add_cross_attention", False):
        raise ValueError(f"ImageReward med_config {path}: add_cross_attention must be true (the text encoder "
                         "cross-attends to the image)")
    return cfg


def _load_tokenizer(folder: Path):
    """BLIP's init_tokenizer: bert-base-uncased + bos '[DEC]' + additional special '[ENC]' (ids 30522, 30523)."""
    from transformers import BertTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"ImageReward tokenizer folder not found: {folder}")
    # transformers quietly builds a 5-token tokenizer from a folder without its files: check them first.
    if not any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(f"ImageReward tokenizer folder {folder} has no vocab.txt or tokenizer.json "
                                "(bert-base-uncased's tokenizer files)")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"ImageReward tokenizer folder {folder}: could not load a BERT tokenizer (expected "
                         f"bert-base-uncased's vocab.txt + tokenizer_config.json): {one_line(e, 200)}") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardGuidance(Guidance):
    """Loss = -ImageReward: ``(mlp(BLIP text [CLS] state, cross-attending to the image) - mean) / std``.

    Weights: ``THUDM/ImageReward`` on the Hugging Face hub, ``ImageReward.pt`` (a bare torch state dict,
    about 1.8 GB in float32: BLIP ViT-L/16 image encoder, BERT-base text encoder with cross-attention,
    reward MLP) and ``med_config.json`` (the BERT config, a few hundred bytes; default: beside the
    checkpoint). The text is tokenised with ``bert-base-uncased``'s tokenizer (``vocab.txt`` +
    ``tokenizer_config.json`` from the hub's ``bert-base-uncased``, about 0.2 MB; ``tokenizer`` = that
    folder, default the checkpoint's folder) plus BLIP's two extra tokens, as ``padding='max_length',
    truncation=True, max_length=35``. The file is read with ``torch.load(weights_only=True)`` (or as
    ``.safetensors``) and its ORIGINAL keys are renamed through an explicit key map
    (``map_image_reward_keys``) onto transformers' ``BlipVisionModel`` / ``BlipTextModel``; every weight the
    score needs must be in the file with the right shape.

    As ``ImageReward.score`` / ``score_gard`` compute it: image -> ViT tokens; prompt ids -> BERT
    cross-attending to all image tokens; [CLS] state -> MLP (768-1024-128-64-16-1, no activations);
    ``(r - 0.16717362830052426) / 1.0333394966054072``. Image side: ImageReward's transform rebuilt
    differentiably: bicubic, antialiased resize of the shortest side to 224, centre crop 224 (torchvision's
    rounding), CLIP mean / std. ``vit``: ``'large'`` (v1.0), ``'base'``, or a dict (width, depth, heads,
    patch_size, image_size[, mlp_dim]) for other BLIP ViTs (tests use a tiny one).
    """

    default_name = "image_reward"

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None, tokenizer: str | None = None,
                 vit: str | dict[str, int] = "large", max_length: int = 35, weight: float = 1.0,
                 name: str | None = None):
        if not checkpoint:
            raise ValueError("ImageRewardGuidance needs checkpoint: a local ImageReward.pt (THUDM/ImageReward on the "
                             "Hugging Face hub)")
        spec = _vit_spec(vit)
        folder = Path(checkpoint).expanduser().parent
        text_cfg = _read_med_config(Path(med_config).expanduser() if med_config else folder / "med_config.json")
        state = map_image_reward_keys(load_state_dict_file(checkpoint, "ImageReward checkpoint"), checkpoint)
        super().__init__(weight, name)
        tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else folder
        self.tokenizer = _load_tokenizer(tokenizer_dir)
        if len(self.tokenizer) != int(text_cfg["vocab_size"]):  # 30522 + [DEC] + [ENC] = 30524 for v1.0
            raise ValueError(f"ImageReward tokenizer {tokenizer_dir} has {len(self.tokenizer)} tokens (with [DEC], "
                             f"[ENC]) but the text encoder's vocab_size is {text_cfg['vocab_size']}: not "
                             "bert-base-uncased's tokenizer?")
        model = ImageRewardModel(spec, text_cfg)
        load_into(model, state, checkpoint, "ImageReward checkpoint (after its key map)")
        del state
        self.model = model.eval()
        self.max_length = int(max_length)
        self.input_size = model.image_size
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> ImageReward's normalised input (N, 3, 224, 224), differentiably."""
        x = resize_shortest_side(images, self.input_size)
        x = center_crop(x, (self.input_size, self.input_size), torchvision_rounding=True)
        return normalize(x, CLIP_MEAN, CLIP_STD)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (len(prompts), max_length), cached per prompt."""
        todo = sorted({p for p in prompts if p not in self._token_cache})
        if todo:
            tokens = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            self._token_cache.update(zip(todo, zip(tokens["input_ids"], tokens["attention_mask"])))
        device = next(self.model.parameters()).device
        ids = torch.stack([self._token_cache[p][0] for p in prompts]).to(device)
        mask = torch.stack([self._token_cache[p][1] for p in prompts]).to(device)
        return ids, mask

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """ImageReward per item (N,), at least float32 (roughly standard normal over generated images)."""
        prompts = need_prompts(self.name, prompts, images.shape[0])
        ids, mask = self.tokenize(prompts)
        raw = at_least_float32(self.model(to_module_dtype(self.preprocess(images), self.model), ids, mask))
        return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item loss (N,): -ImageReward."""
        return -self.score(images, prompts)
