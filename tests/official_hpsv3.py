"""A transcription of HPSv3's scoring (MizzenAI/HPSv3, the ``hpsv3`` 1.0.0 wheel on PyPI), for parity tests only.

Transcribed from ``hpsv3/inference.py`` (``HPSv3RewardInferencer.prepare_batch`` / ``reward``),
``hpsv3/model/qwen2vl_trainer.py`` (``Qwen2VLRewardModelBT``), ``hpsv3/train.py``
(``create_model_and_processor``: ``<|Reward|>`` added, embeddings resized, ``rm_head`` in float32),
``hpsv3/dataset/data_collator_qwen.py`` (the prompt) and ``hpsv3/dataset/utils.py`` (qwen-vl-utils'
``fetch_image``: PIL bicubic resize to ``smart_resize``). The package pins transformers 4.45.2, so it cannot be
installed beside transformers 5; the only changes are transformers 5's names: ``self.model.embed_tokens`` ->
``self.model.language_model.embed_tokens``, ``self.model(...)`` (4.45's text model) -> ``self.model.language_model``,
and the vision tower's merged features now come back as ``.pooler_output``. The image side is the reference's own
non-differentiable path: PIL resize, then transformers' PIL ``Qwen2VLImageProcessorPil`` inside ``Qwen2VLProcessor``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Qwen2VLForConditionalGeneration

INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n
**Visual Quality:**  \n\
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n
**Text Alignment:**  \n\
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""

prompt_with_special_token = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


# ---------------------------------------------------------------- hpsv3/dataset/utils.py (qwen-vl-utils)

def round_by_factor(number, factor):
    return round(number / factor) * factor


def ceil_by_factor(number, factor):
    return math.ceil(number / factor) * factor


def floor_by_factor(number, factor):
    return math.floor(number / factor) * factor


def smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28):
    if max(height, width) / min(height, width) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def fetch_image(ele):
    """The PIL branch of fetch_image: convert to RGB, resize with PIL BICUBIC to smart_resize(min/max_pixels)."""
    from PIL import Image

    image = ele["image"].convert("RGB")
    width, height = image.size
    resized_height, resized_width = smart_resize(height, width, factor=28, min_pixels=ele["min_pixels"],
                                                 max_pixels=ele["max_pixels"])
    return image.resize((resized_width, resized_height), Image.BICUBIC)


def process_vision_info(conversations):
    image_inputs = []
    for conversation in conversations:
        for message in conversation:
            for ele in message["content"]:
                if "image" in ele:
                    image_inputs.append(fetch_image(ele))
    return image_inputs, None


# ---------------------------------------------------------------- hpsv3/model/qwen2vl_trainer.py

class Qwen2VLRewardModelBT(Qwen2VLForConditionalGeneration):
    """``rm_head_type='ranknet'`` without ``rm_head_kwargs`` (HPSv3_7B.yaml), ``reward_token='special'``."""

    def __init__(self, config, output_dim=2, reward_token="special", special_token_ids=None):
        super().__init__(config)
        self.output_dim = output_dim
        self.rm_head = nn.Sequential(
            nn.Linear(config.text_config.hidden_size, 1024),
            nn.ReLU(),
            nn.Dropout(0.05),
            nn.Linear(1024, 16),
            nn.ReLU(),
            nn.Linear(16, output_dim),
        )
        self.rm_head.to(torch.float32)
        self.reward_token = reward_token
        self.special_token_ids = special_token_ids
        if self.special_token_ids is not None:
            self.reward_token = "special"

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, **unused):
        inputs_embeds = self.model.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            pixel_values = pixel_values.type(self.model.visual.get_dtype())
            image_embeds = self.model.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
            image_embeds = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)

        outputs = self.model.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        hidden_states = outputs[0]  # [B, L, D]
        logits = self.rm_head(hidden_states.float())  # autocast to float32 in the reference

        batch_size = input_ids.shape[0]
        special_token_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for special_token_id in self.special_token_ids:
            special_token_mask = special_token_mask | (input_ids == special_token_id)
        pooled_logits = logits[special_token_mask, ...]
        pooled_logits = pooled_logits.view(batch_size, 1, -1)
        pooled_logits = pooled_logits.view(batch_size, -1)
        return {"logits": pooled_logits}


# ---------------------------------------------------------------- hpsv3/inference.py

def prepare_batch(processor, images, prompts):
    """``HPSv3RewardInferencer.prepare_batch`` on PIL images (``use_special_tokens: true``)."""
    max_pixels = 256 * 28 * 28
    message_list = []
    for text, image in zip(prompts, images):
        out_message = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image, "min_pixels": max_pixels, "max_pixels": max_pixels},
                    {"type": "text", "text": INSTRUCTION.format(text_prompt=text) + prompt_with_special_token},
                ],
            }
        ]
        message_list.append(out_message)
    image_inputs, _ = process_vision_info(message_list)
    return processor(
        text=processor.apply_chat_template(message_list, tokenize=False, add_generation_prompt=True),
        images=image_inputs,
        padding=True,
        return_tensors="pt",
    )


@torch.no_grad()
def reward(model, processor, images, prompts):
    """``HPSv3RewardInferencer.reward``: (N, 2) (mu, sigma); the score is ``[:, 0]``."""
    batch = prepare_batch(processor, images, prompts)
    return model(return_dict=True, **batch)["logits"]


def load_processor(folder):
    """``create_model_and_processor``'s processor (padding right, ``<|Reward|>`` added), with transformers' PIL
    image processor (the numpy / PIL path transformers 4.45 had)."""
    from transformers import AutoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = AutoProcessor.from_pretrained(str(folder), padding_side="right")
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    return processor
