"""HPSv3 guidance: Human Preference Score v3 (Ma et al., ICCV 2025), a Qwen2-VL-7B-Instruct fine-tuned with a
reward head that reads the hidden state of an added ``<|Reward|>`` token (MizzenAI/HPSv3, ``hpsv3.inference``)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .augment import normalize
from .base import Guidance
from .clip_processor import bicubic_resize
from .loading import load_state_dict_file, one_line
from .pickscore import need_prompts
from ..precision import at_least_float32

__all__ = ["HPSv3Guidance", "map_hpsv3_keys", "smart_resize", "patchify", "HPSV3_INSTRUCTION", "HPSV3_REWARD_PROMPT"]

# The reference's prompt (hpsv3/dataset/data_collator_qwen.py, INSTRUCTION + prompt_with_special_token), verbatim:
# its trailing spaces are part of the tokens the model was trained on.
HPSV3_INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 "
    "being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
REWARD_TOKEN = "<|Reward|>"
HPSV3_REWARD_PROMPT = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
# hpsv3.inference.prepare_batch: min_pixels = max_pixels = 256 * 28 * 28 (448 x 448 for a square image)
HPSV3_PIXELS = 256 * 28 * 28
MAX_ASPECT = 200  # qwen-vl-utils refuses images more elongated than this

# Checkpoint key prefixes -> ours. HPSv3.safetensors holds Qwen2VLRewardModelBT's whole state dict; transformers 4.x
# (the hpsv3 package pins 4.45.2) names the parts visual.* / model.* , transformers >= 4.52 model.visual.* /
# model.language_model.*; both are read. lm_head (next-token logits) is never used by the score and is dropped.
_KEY_PREFIXES = (
    ("model.visual.", "backbone.visual."),
    ("model.language_model.", "backbone.language_model."),
    ("visual.", "backbone.visual."),
    ("model.", "backbone.language_model."),
    ("rm_head.", "head."),
)
_DROPPED = ("lm_head.",)


def map_hpsv3_keys(state: dict[str, Tensor], path) -> dict[str, Tensor]:
    """HPSv3 checkpoint keys (either transformers layout) -> this module's names; lm_head dropped."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(_DROPPED):
            continue
        new = next((ours + key[len(theirs):] for theirs, ours in _KEY_PREFIXES if key.startswith(theirs)), None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"HPSv3 checkpoint {path}: keys outside a Qwen2VLRewardModelBT state dict ({len(unknown)}): "
                         f"{', '.join(unknown[:4])}; expected visual.*, model.*, lm_head.*, rm_head.*")
    if not any(k.startswith("head.") for k in out):
        raise ValueError(f"HPSv3 checkpoint {path} has no rm_head.* weights: is it HPSv3.safetensors (the reward "
                         "model) rather than the Qwen2-VL base model?")
    return out


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size (qwen-vl-utils ``smart_resize``, as HPSv3's ``dataset/utils.py`` copies it): both
    sides multiples of ``factor`` (patch 14 x merge 2 = 28), area in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"HPSv3: images {height}x{width} are more elongated than Qwen2-VL's limit of {MAX_ASPECT}:1; "
                         "generate a less extreme aspect ratio")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: Tensor, patch: int, merge: int, temporal: int) -> Tensor:
    """(N, C, H, W) normalised images -> Qwen2-VL's flat patches (N * H/patch * W/patch, C * temporal * patch**2).

    As ``Qwen2VLImageProcessor``: a still image is its own ``temporal`` frames; rows run over merge windows
    (merge x merge neighbouring patches, so ``PatchMerger`` sees each window contiguously), each row is
    (channel, frame, patch row, patch column).
    """
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, gh/m, gw/m, m, m, C, patch, patch)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(n * gh * gw, c * temporal * patch * patch)


@contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (no memory, no random init: the checkpoint brings every one,
    ``load_state_dict(assign=True)``) and buffers real (the rotary ``inv_freq`` are computed, never stored)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _reward_head(state: dict[str, Tensor], path, hidden: int) -> nn.Sequential:
    """HPSv3's ``rm_head`` (``rm_head_type: ranknet`` without kwargs): Linear(hidden, 1024), ReLU, Dropout(0.05),
    Linear(1024, 16), ReLU, Linear(16, 2) -> (mu, sigma); the inner sizes read from the checkpoint."""
    need = ("head.0.weight", "head.3.weight", "head.5.weight")
    if any(k not in state for k in need) or any(k.startswith("head.") and k.split(".")[1] not in "035"
                                                for k in state):
        found = sorted({k.split(".")[1] for k in state if k.startswith("head.")})
        raise ValueError(f"HPSv3 checkpoint {path}: rm_head has layers {found}, expected HPSv3's ranknet head "
                         "(rm_head.0, rm_head.3, rm_head.5)")
    a, b, o = (state[k].shape[0] for k in need)
    bias = "head.5.bias" in state
    with _parameters_on_meta():
        return nn.Sequential(nn.Linear(hidden, a), nn.ReLU(), nn.Dropout(0.05), nn.Linear(a, b), nn.ReLU(),
                             nn.Linear(b, o, bias=bias))


def _require_base(path: str | None) -> Path:
    if not path:
        raise ValueError("HPSv3Guidance needs base_model: a local folder of Qwen/Qwen2-VL-7B-Instruct's config.json, "
                         "tokenizer and preprocessor_config.json (its weights are not read)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"HPSv3 base model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"HPSv3 base model folder {folder} has no config.json")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"HPSv3 base model folder {folder} has no Qwen2 tokenizer files "
                                "(tokenizer.json, or vocab.json + merges.txt)")
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise FileNotFoundError(f"HPSv3 base model folder {folder} has no preprocessor_config.json")
    return folder


def _load_processor(folder: Path):
    """(tokenizer with ``<|Reward|>`` added, image processor) as ``hpsv3.train.create_model_and_processor``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"HPSv3 base model folder {folder}: could not load the Qwen2-VL tokenizer and image "
                         f"processor: {one_line(e, 240)}") from None
    if not tokenizer.chat_template:
        raise ValueError(f"HPSv3 base model folder {folder}: its tokenizer has no chat template (Qwen2-VL-Instruct's "
                         "tokenizer_config.json or chat_template.json carries it)")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return tokenizer, image_processor


def _pixel_limits(processor) -> tuple[int, int]:
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    low = get("shortest_edge") or getattr(processor, "min_pixels", None)
    high = get("longest_edge") or getattr(processor, "max_pixels", None)
    return int(low or 56 * 56), int(high or 28 * 28 * 1280)


class HPSv3Guidance(Guidance):
    """Loss = -HPSv3: ``mu`` of the reward head on the last hidden state of the ``<|Reward|>`` token.

    Weights: ``MizzenAI/HPSv3`` on the Hugging Face hub, ``HPSv3.safetensors`` (the whole reward model: Qwen2-VL-7B
    plus ``rm_head``, about 16 GB in bfloat16), read with safetensors (or a weights-only torch file) into a
    Qwen2-VL built on the meta device, so no random 8B model is ever made; parameters keep the file's dtypes
    (bfloat16 backbone, float32 head, as the reference runs). ``base_model``: a local folder of
    ``Qwen/Qwen2-VL-7B-Instruct`` holding ``config.json``, the tokenizer (with its chat template) and
    ``preprocessor_config.json``; its weight files are not read.

    As ``HPSv3RewardInferencer.reward`` scores (``hpsv3/inference.py`` with ``model/qwen2vl_trainer.py``): one user
    turn holding the image then ``INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token`` through the
    Qwen2-VL chat template with the generation prompt, ``<|Reward|>`` added to the tokenizer as a special token;
    image features scattered into the ``<|image_pad|>`` positions; the language model run WITHOUT position ids, so
    every token (image ones included) gets its 1-D position on all three M-RoPE axes (the reward model's own
    ``forward`` bypasses Qwen2-VL's 2-D image positions); ``rm_head`` on the final (normed) hidden state of
    ``<|Reward|>``; the score is its first output (mu; the second is the uncertainty sigma).

    Image side, rebuilt differentiably: qwen-vl-utils' ``fetch_image`` resizes to ``smart_resize(H, W, 28,
    pixels, pixels)`` (bicubic; antialiased like PIL), then the image processor's own ``smart_resize`` with its
    min / max pixels (the identity for HPSv3's sizes), rescale to [0, 1], CLIP mean / std, and Qwen2-VL's patch
    layout (``patchify``). ``pixels``: the area images are resized to; 256 * 28 * 28 (448 x 448 for a square
    image) is what HPSv3 was trained and evaluated at.
    """

    default_name = "hpsv3"

    def __init__(self, checkpoint: str | None = None, base_model: str | None = None, pixels: int = HPSV3_PIXELS,
                 weight: float = 1.0, name: str | None = None):
        if not checkpoint:
            raise ValueError("HPSv3Guidance needs checkpoint: a local HPSv3.safetensors (MizzenAI/HPSv3 on the Hugging "
                             "Face hub)")
        folder = _require_base(base_model)
        if int(pixels) < 28 * 28:
            raise ValueError(f"HPSv3Guidance: pixels={pixels} is below one 28 x 28 merge window; use 256 * 28 * 28 "
                             "(HPSv3's) or another multiple of 784")
        super().__init__(weight, name)
        self.tokenizer, image_processor = _load_processor(folder)  # small: checked before the big file is read
        self._configure_pixels(image_processor, int(pixels))
        state = map_hpsv3_keys(load_state_dict_file(checkpoint, "HPSv3 checkpoint"), checkpoint)
        self.backbone = self._build_backbone(folder, state, checkpoint)
        self.head = _reward_head(state, checkpoint, int(self.backbone.config.text_config.hidden_size))
        self._assign(state, checkpoint)
        del state
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = int(self.backbone.config.image_token_id)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._token_cache: dict[tuple[str, int], tuple[list[int], int]] = {}
        self.freeze()

    def _configure_pixels(self, processor, pixels: int) -> None:
        self.patch = int(getattr(processor, "patch_size", 14))
        self.merge = int(getattr(processor, "merge_size", 2))
        self.temporal = int(getattr(processor, "temporal_patch_size", 2))
        self.factor = self.patch * self.merge
        self.pixels = pixels
        self.processor_pixels = _pixel_limits(processor)
        # do_rescale maps uint8 by 1/255 and a [0, 1] image is ours (x + 1) / 2: normalize() takes [-1, 1] images.
        self.mean = tuple(float(v) for v in processor.image_mean)
        self.std = tuple(float(v) for v in processor.image_std)

    def _build_backbone(self, folder: Path, state: dict[str, Tensor], path) -> nn.Module:
        from transformers import Qwen2VLConfig, Qwen2VLModel

        try:
            config = Qwen2VLConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise ValueError(f"HPSv3 base model folder {folder}: config.json is not a Qwen2-VL config: "
                             f"{one_line(e, 200)}") from None
        embed = state.get("backbone.language_model.embed_tokens.weight")
        if embed is None:
            raise ValueError(f"HPSv3 checkpoint {path} has no token embeddings (model.embed_tokens.weight): not an "
                             "HPSv3 reward model")
        # The reference resizes the embeddings to the tokenizer after adding <|Reward|>: the file has that many rows.
        if len(self.tokenizer) > embed.shape[0]:
            raise ValueError(f"HPSv3 checkpoint {path} has {embed.shape[0]} token embeddings but the tokenizer of "
                             f"{folder} has {len(self.tokenizer)} tokens with {REWARD_TOKEN}: use "
                             "Qwen2-VL-7B-Instruct's tokenizer")
        config.text_config.vocab_size = int(embed.shape[0])
        config._attn_implementation = "sdpa"  # as the reference without flash-attention
        for sub in (config.text_config, config.vision_config):
            sub._attn_implementation = "sdpa"
        with _parameters_on_meta():
            return Qwen2VLModel(config)

    def _assign(self, state: dict[str, Tensor], path) -> None:
        own = dict(self.backbone.named_parameters(prefix="backbone"))
        own.update(self.head.named_parameters(prefix="head"))
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {tuple(state[k].shape)} != expected {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            parts = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                     for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("wrong shapes", shapes)) if keys]
            raise ValueError(f"HPSv3 checkpoint {path} does not match the Qwen2-VL of its base model config: "
                             + "; ".join(parts))
        for module, prefix in ((self.backbone, "backbone."), (self.head, "head.")):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=False, assign=True)  # buffers are computed, parameters all given

    def preprocess(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, 3, H, W) in [-1, 1] -> (flat patches (N * h * w, C * 2 * 14 * 14), grid_thw (N, 3)),
        differentiably; every image of the batch has the same size, so the same grid."""
        h, w = smart_resize(*images.shape[-2:], self.factor, self.pixels, self.pixels)
        x = bicubic_resize(images, (h, w))  # qwen-vl-utils fetch_image (PIL bicubic)
        ph, pw = smart_resize(h, w, self.factor, *self.processor_pixels)
        x = bicubic_resize(x, (ph, pw))  # the image processor's own resize (identity at HPSv3's sizes)
        patches = patchify(normalize(x, self.mean, self.std), self.patch, self.merge, self.temporal)
        grid = torch.tensor([[1, ph // self.patch, pw // self.patch]] * images.shape[0], device=images.device)
        return patches, grid

    def tokenize(self, prompts: Sequence[str], image_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask) right-padded (N, L) and the position of each row's ``<|Reward|>`` (N,)."""
        rows = []
        for prompt in prompts:
            key = (prompt, image_tokens)
            if key not in self._token_cache:
                self._token_cache[key] = self._encode(prompt, image_tokens)
            rows.append(self._token_cache[key])
        length = max(len(ids) for ids, _ in rows)
        device = self.head[0].weight.device
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        where = torch.tensor([at for _, at in rows])
        return ids.to(device), mask.to(device), where.to(device)

    def _encode(self, prompt: str, image_tokens: int) -> tuple[list[int], int]:
        text = HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_PROMPT
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if chat.count(pad) != 1:
            raise ValueError(f"HPSv3: the chat template gave {chat.count(pad)} image placeholders for one image; use "
                             "Qwen2-VL-Instruct's chat template")
        ids = self.tokenizer(chat.replace(pad, pad * image_tokens))["input_ids"]
        at = [i for i, t in enumerate(ids) if t == self.reward_token_id]
        if len(at) != 1:
            raise ValueError(f"HPSv3: prompt {prompt!r} holds {REWARD_TOKEN} itself; remove it from the prompt")
        return list(ids), at[0]

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """HPSv3 per item (N,), at least float32: the head's mu at each image's ``<|Reward|>`` token."""
        prompts = need_prompts(self.name, prompts, images.shape[0])
        patches, grid = self.preprocess(images)
        visual = self.backbone.visual
        image_embeds = visual(patches.to(visual.dtype), grid_thw=grid).pooler_output  # (N * tokens, D), merged
        per_image = image_embeds.shape[0] // images.shape[0]
        ids, mask, where = self.tokenize(prompts, per_image)
        text = self.backbone.language_model
        embeds = text.embed_tokens(ids)
        is_image = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))
        # 1-D positions on the three M-RoPE axes, as the reference (see the class docstring)
        positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        hidden = text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        reward_state = hidden[torch.arange(ids.shape[0], device=ids.device), where]
        head_dtype = self.head[0].weight.dtype
        return at_least_float32(self.head(at_least_float32(reward_state).to(head_dtype))[:, 0])

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item loss (N,): -HPSv3."""
        return -self.score(images, prompts)
