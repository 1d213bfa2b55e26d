"""The preference rewards of 2024-25 (HPSv3, MPS) on tiny random models in each reward's released file layout,
loaded through the same code path as the real checkpoints; scores checked against transcriptions of each
reference's scoring code (tests/official_hpsv3.py, tests/official_mps.py) run on the reference's own
non-differentiable preprocessing (PIL). Every test name holds hpsv3 or mps (``-k`` selects them)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

import official_hpsv3
import official_mps
from doodl_lightning.guidance import HPSv3Guidance, MPSGuidance
from doodl_lightning.guidance.hpsv3 import HPSV3_INSTRUCTION, HPSV3_REWARD_PROMPT
from doodl_lightning.guidance.mps import MPS_CONDITION
from test_rewards import assert_batch_independent, images, one_line_error, optimise_pixels, smooth_uint8, write_evil

PROMPTS = ["a red circle", "a blue square", "a photo of a cat"]

# Qwen2-VL-Instruct's chat template (its tokenizer_config.json), the one HPSv3's processor applies
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def pil(arrays: list[torch.Tensor]) -> list[Image.Image]:
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arrays]


def to_unit(arrays: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images -> one float batch in [-1, 1], exactly the values the reference's /255 sees."""
    return torch.stack(arrays).double().div(127.5).sub(1).float()


# ================================================================ HPSv3

def tiny_qwen2_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's special tokens, its merges learnt from HPSv3's prompt (so the
    2.5k-character instruction is a few hundred tokens), as transformers' Qwen2Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=QWEN2_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([HPSV3_INSTRUCTION + HPSV3_REWARD_PROMPT] + PROMPTS, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None)
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def old_layout(key: str) -> str:
    """transformers 5 names -> the 4.45 names the hpsv3 package saves (visual.*, model.* = the text model)."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    """Qwen2-VL-7B-Instruct's folder layout (config.json, tokenizer files with the chat template,
    preprocessor_config.json) for a tiny random Qwen2-VL, and HPSv3.safetensors: the reward model as
    hpsv3.train builds it (``<|Reward|>`` added, embeddings resized, ranknet head) in the 4.45 key layout."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("hpsv3")
    base = folder / "Qwen2-VL-7B-Instruct"
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.save_pretrained(str(base))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(str(base))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         initializer_range=0.2, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, initializer_range=0.2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.save_pretrained(str(base))
    processor = official_hpsv3.load_processor(base)
    torch.manual_seed(0)
    ref = official_hpsv3.Qwen2VLRewardModelBT(
        config, special_token_ids=processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"]))
    ref.resize_token_embeddings(len(processor.tokenizer))
    ref.config.pad_token_id = processor.tokenizer.pad_token_id
    ref.eval()
    state = {old_layout(k): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(folder / "HPSv3.safetensors"))
    return {"base": base, "checkpoint": folder / "HPSv3.safetensors", "ref": ref, "processor": processor,
            "state": state}


@pytest.fixture(scope="module")
def hpsv3(hpsv3_files):
    return HPSv3Guidance(checkpoint=str(hpsv3_files["checkpoint"]), base_model=str(hpsv3_files["base"]))


def test_hpsv3_prompt_is_the_reference_prompt():
    assert HPSV3_INSTRUCTION == official_hpsv3.INSTRUCTION
    assert HPSV3_REWARD_PROMPT == official_hpsv3.prompt_with_special_token
    assert len(HPSV3_INSTRUCTION) == 2523  # the wheel's INSTRUCTION, trailing spaces included


def test_hpsv3_equals_the_reference_at_its_input_size(hpsv3, hpsv3_files):
    """448 x 448 images are HPSv3's own size (smart_resize's identity): the preprocessing is exact on both sides, so
    the scores agree to float32 rounding (measured 6e-8; 1e-4 allowed, while the two images differ by 5e-2)."""
    arrays = [smooth_uint8(448, 448, seed=s) for s in (0, 1)]
    expected = official_hpsv3.reward(hpsv3_files["ref"], hpsv3_files["processor"], pil(arrays), PROMPTS[:2])
    x = to_unit(arrays)
    with torch.no_grad():
        patches, grid = hpsv3.preprocess(x)
        batch = official_hpsv3.prepare_batch(hpsv3_files["processor"], pil(arrays), PROMPTS[:2])
        assert torch.equal(grid, batch["image_grid_thw"])
        assert torch.allclose(patches, batch["pixel_values"], atol=1e-5)
        ids, mask, _ = hpsv3.tokenize(PROMPTS[:2], int(grid[0].prod()) // 4)
        assert torch.equal(ids * mask, batch["input_ids"] * batch["attention_mask"])
        ours = hpsv3.score(x, PROMPTS[:2])
    assert expected.shape == (2, 2) and (expected[0, 0] - expected[1, 0]).abs() > 1e-3  # the images differ
    assert torch.allclose(ours, expected[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(hpsv3(x, PROMPTS[:2]), -expected[:, 0], atol=1e-4, rtol=1e-4)
    assert hpsv3.name == "hpsv3" and not any(p.requires_grad for p in hpsv3.parameters())


def test_hpsv3_resizes_as_the_reference_for_generated_sizes(hpsv3, hpsv3_files):
    """A 64 x 48 image is enlarged to smart_resize's 532 x 392 (its ceil rounding may pass 256 * 28 * 28): PIL
    resizes the uint8 image and rounds to uint8, ours stays float, hence pixel differences of about 1/255 (0.02 in
    normalised units bounds them); measured score difference 2e-4, tolerance 2e-3, while different images move the
    score by 3e-2."""
    arrays = [smooth_uint8(64, 48, seed=2)]
    batch = official_hpsv3.prepare_batch(hpsv3_files["processor"], pil(arrays), PROMPTS[:1])
    x = to_unit(arrays)
    with torch.no_grad():
        patches, grid = hpsv3.preprocess(x)
        assert grid.tolist() == batch["image_grid_thw"].tolist() == [[1, 38, 28]]
        assert (patches - batch["pixel_values"]).abs().max() < 0.02
        expected = official_hpsv3.reward(hpsv3_files["ref"], hpsv3_files["processor"], pil(arrays), PROMPTS[:1])
        assert torch.allclose(hpsv3.score(x, PROMPTS[:1]), expected[:, 0], atol=2e-3)


def test_hpsv3_gradients_optimisation_and_batch_independence(hpsv3_files):
    small = HPSv3Guidance(checkpoint=str(hpsv3_files["checkpoint"]), base_model=str(hpsv3_files["base"]),
                          pixels=16 * 28 * 28)  # 112 x 112: the same model on fewer image tokens, for speed
    first, last = optimise_pixels(small, ["a red circle"], size=32, steps=4)
    assert last < first
    assert_batch_independent(small, size=32)
    with pytest.raises(ValueError, match="one prompt per image"):
        small(images(2), ["only one"])


def test_hpsv3_reads_the_transformers_5_key_layout_too(hpsv3, hpsv3_files, tmp_path):
    """hpsv3 on transformers >= 4.52 saves model.visual.* / model.language_model.*: the same weights, the same score."""
    from safetensors.torch import save_file

    new = {k: v for k, v in hpsv3_files["ref"].state_dict().items()}
    save_file({k: v.contiguous() for k, v in new.items()}, str(tmp_path / "HPSv3.safetensors"))
    other = HPSv3Guidance(checkpoint=str(tmp_path / "HPSv3.safetensors"), base_model=str(hpsv3_files["base"]),
                          pixels=4 * 28 * 28)
    x = images(2, 32)
    small = HPSv3Guidance(checkpoint=str(hpsv3_files["checkpoint"]), base_model=str(hpsv3_files["base"]),
                          pixels=4 * 28 * 28)
    with torch.no_grad():
        assert torch.equal(other(x, PROMPTS[:2]), small(x, PROMPTS[:2]))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hpsv3_bad_files_fail_in_one_line(hpsv3_files, tmp_path):
    from safetensors.torch import save_file

    base, ckpt = str(hpsv3_files["base"]), str(hpsv3_files["checkpoint"])
    with pytest.raises(ValueError, match="needs checkpoint: a local HPSv3.safetensors") as e:
        HPSv3Guidance(base_model=base)
    one_line_error(e)
    with pytest.raises(ValueError, match="needs base_model") as e:
        HPSv3Guidance(checkpoint=ckpt)
    one_line_error(e)
    with pytest.raises(FileNotFoundError, match="HPSv3 base model folder not found") as e:
        HPSv3Guidance(checkpoint=ckpt, base_model=str(tmp_path / "nowhere"))
    one_line_error(e)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(base, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    with pytest.raises(FileNotFoundError, match="no_tokenizer has no Qwen2 tokenizer files") as e:
        HPSv3Guidance(checkpoint=ckpt, base_model=str(no_tokenizer))
    one_line_error(e)
    with pytest.raises(FileNotFoundError, match="HPSv3 checkpoint not found") as e:
        HPSv3Guidance(checkpoint=str(tmp_path / "missing.safetensors"), base_model=base)
    one_line_error(e)
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"arbitrary pickled objects are refused") as e:
        HPSv3Guidance(checkpoint=write_evil(tmp_path / "evil.pt", marker), base_model=base)
    one_line_error(e)
    assert not marker.exists()
    # the Qwen2-VL base model's weights instead of the reward model's
    state = hpsv3_files["state"]
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(tmp_path / "base.safetensors"))
    with pytest.raises(ValueError, match="has no rm_head.\\* weights: is it HPSv3.safetensors") as e:
        HPSv3Guidance(checkpoint=str(tmp_path / "base.safetensors"), base_model=base)
    one_line_error(e)
    # weights of another model than base_model's config.json describes
    wrong = dict(state)
    wrong["rm_head.0.weight"] = torch.zeros(1024, 16)
    save_file(wrong, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(ValueError, match=r"does not match the Qwen2-VL of its base model config: wrong shapes \(1\): "
                                         r"head.0.weight \(1024, 16\) != expected \(1024, 32\)") as e:
        HPSv3Guidance(checkpoint=str(tmp_path / "shapes.safetensors"), base_model=base)
    one_line_error(e)
    with pytest.raises(ValueError, match="holds <\\|Reward\\|> itself") as e:
        HPSv3Guidance(checkpoint=ckpt, base_model=base, pixels=4 * 28 * 28)(images(1), ["cheat <|Reward|>"])
    one_line_error(e)


@pytest.mark.slow
def test_hpsv3_doodl_fit_through_the_cli(hpsv3_files, tiny_pipeline_dir, write_config, tmp_path):
    """Slow (12 s on the shared 2-core CPU). Fast twins: the optimisation in
    test_hpsv3_gradients_optimisation_and_batch_independence and experiments/sd15/hpsv3.yaml parsed by test_configs."""
    from cli import main

    guidance = [{"class_path": "doodl_lightning.guidance.HPSv3Guidance",
                 "init_args": {"checkpoint": str(hpsv3_files["checkpoint"]), "base_model": str(hpsv3_files["base"]),
                               "pixels": 4 * 28 * 28}}]
    out = tmp_path / "fit"
    cfg = write_config(tmp_path / "hpsv3.yaml", tiny_pipeline_dir, out, steps=3, guidance=guidance,
                       prompts=["a red circle"], seeds=[0], update_rule="adam", lr=0.05,
                       callbacks=[{"class_path": "callbacks.ResultsWriter"}])
    cli = main(["fit", "--config", cfg])
    records = [json.loads(x) for x in (out / "lightning_logs/version_0/results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and set(records[0]["final_terms"]) == {"hpsv3"}
    assert records[0]["final_loss"] < records[0]["initial_loss"], records
    assert cli.model.latents.grad is not None and cli.model.latents.grad.abs().sum() > 0


# ================================================================ MPS

MPS_CROSS = dict(dim=16, layer_num=2, heads=2, dim_head=8)  # the released model: 1024, 4, 16, 64


@pytest.fixture(scope="module")
def mps_files(tmp_path_factory):
    """laion/CLIP-ViT-H-14's folder layout (config.json, preprocessor_config.json, CLIP tokenizer) for a tiny CLIP,
    and MPS's weights as its pickled model converts to a state dict (model.* + cross_model.*, with the
    position_ids buffers transformers 4.27 saved), in safetensors."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from doodl_lightning.shapes.tokenizer import _tokenizer_from_merges

    folder = tmp_path_factory.mktemp("mps")
    processor = folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    # CLIP's byte-level BPE with a single merge: text is spelt byte by byte (the condition fills the 77 tokens),
    # 515 ids with <|endoftext|> the largest, as in CLIP's own vocabulary; built in a fraction of the full one's time
    tokenizer = _tokenizer_from_merges([("t", "h")], str(processor), 77)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=MPS_CROSS["dim"], logit_scale_init_value=math.log(50.0),
    )
    config.save_pretrained(str(processor))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image_processor.save_pretrained(str(processor))
    ref = official_mps.MPSModel(CLIPModel(config), **MPS_CROSS).eval()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["model.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    state["model.vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    save_file(state, str(folder / "MPS_overall.safetensors"))
    # the reference's own processor and tokenizer (PIL image path), loaded back from the folder once
    reference = (CLIPImageProcessorPil.from_pretrained(str(processor)), AutoTokenizer.from_pretrained(str(processor)))
    return {"processor": processor, "checkpoint": folder / "MPS_overall.safetensors", "ref": ref, "state": state,
            "reference": reference}


@pytest.fixture(scope="module")
def mps(mps_files):
    return MPSGuidance(checkpoint=str(mps_files["checkpoint"]), processor=str(mps_files["processor"]))


def _reference_mps(mps_files, arrays, prompts, threshold=0.3):
    clip_processor, tokenizer = mps_files["reference"]
    return torch.stack([official_mps.infer_one_sample(image, prompt, mps_files["ref"], clip_processor, tokenizer,
                                                      threshold=threshold)[0]
                        for image, prompt in zip(pil(arrays), prompts)])


def test_mps_condition_is_the_reference_condition(mps):
    assert MPS_CONDITION == official_mps.CONDITION and mps.condition == MPS_CONDITION
    assert mps.condition_threshold == 0.3 and mps.max_length == 77


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_mps_equals_the_reference_infer_one_sample(mps, mps_files, threshold):
    """At the model's input size the processor's resize and crop are identities on both sides: agreement to float32
    rounding (1e-4 on a logit_scale 50 score). The tiny CLIP's normalised prompt-condition similarities lie in
    [0.23, 1], so the evaluations' 0.3 keeps all but a token or two; 0.5 drops a third to half of each prompt's
    tokens, exercising the masked cross-attention on every item."""
    if threshold != 0.3:
        mps = MPSGuidance(checkpoint=str(mps_files["checkpoint"]), processor=str(mps_files["processor"]),
                          condition_threshold=threshold)
    arrays = [smooth_uint8(32, 32, seed=s) for s in (0, 1, 2)]
    expected = _reference_mps(mps_files, arrays, PROMPTS, threshold)
    x = to_unit(arrays)
    with torch.no_grad():
        _, _, mask = mps.prompt_side(PROMPTS)
        kept = torch.isfinite(mask).sum(-1)
        assert (kept > 0).all() and (threshold == 0.3 or (kept < 77).all())
        ours = mps.score(x, PROMPTS)
        assert torch.allclose(ours, expected, atol=1e-4)
        assert torch.allclose(mps(x, PROMPTS), -expected, atol=1e-4)
    assert expected.std() > 1e-2  # the three scores differ
    assert mps.name == "mps" and not any(p.requires_grad for p in mps.parameters())


@pytest.mark.parametrize("hw", [(48, 40), (24, 30)])
def test_mps_resize_and_crop_match_the_clip_processor(mps, mps_files, hw):
    """Other sizes: PIL resizes the uint8 image and rounds (about 1/255, 0.03 in normalised units); scores within 0.05
    on a scale-50 score whose spread across images is about 1."""
    arrays = [smooth_uint8(*hw, seed=4)]
    x = to_unit(arrays)
    with torch.no_grad():
        assert torch.allclose(mps.score(x, PROMPTS[:1]), _reference_mps(mps_files, arrays, PROMPTS[:1]), atol=0.05)


def test_mps_gradients_optimisation_and_batch_independence(mps):
    first, last = optimise_pixels(mps, ["a red circle"])
    assert last < first
    assert_batch_independent(mps)
    with pytest.raises(ValueError, match="one prompt per image"):
        mps(images(2), ["only one"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_mps_bad_files_fail_in_one_line(mps_files, tmp_path):
    from safetensors.torch import save_file

    proc, ckpt = str(mps_files["processor"]), str(mps_files["checkpoint"])
    with pytest.raises(ValueError, match="needs checkpoint") as e:
        MPSGuidance(processor=proc)
    one_line_error(e)
    with pytest.raises(ValueError, match="needs processor") as e:
        MPSGuidance(checkpoint=ckpt)
    one_line_error(e)
    with pytest.raises(FileNotFoundError, match="MPS checkpoint not found") as e:
        MPSGuidance(checkpoint=str(tmp_path / "missing.pth"), processor=proc)
    one_line_error(e)
    with pytest.raises(FileNotFoundError, match="MPS processor folder not found") as e:
        MPSGuidance(checkpoint=ckpt, processor=str(tmp_path / "nowhere"))
    one_line_error(e)
    # the released file is a pickled nn.Module: refused, never run, with the conversion named
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="objects are refused.*is a pickled model: convert it once") as e:
        MPSGuidance(checkpoint=write_evil(tmp_path / "MPS_overall_checkpoint.pth", marker), processor=proc)
    one_line_error(e)
    assert not marker.exists()
    plain = {k: v for k, v in mps_files["state"].items() if not k.startswith("cross_model.")}
    save_file(plain, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="has no cross_model.\\* weights") as e:
        MPSGuidance(checkpoint=str(tmp_path / "clip.safetensors"), processor=proc)
    one_line_error(e)
    wrong = dict(mps_files["state"])
    wrong["model.text_projection.weight"] = torch.zeros(8, 32)
    save_file(wrong, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(ValueError, match=r"does not match CLIPModel: wrong shapes \(1\): text_projection.weight") as e:
        MPSGuidance(checkpoint=str(tmp_path / "shapes.safetensors"), processor=proc)
    one_line_error(e)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(proc, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    with pytest.raises(FileNotFoundError, match="no_tokenizer has no CLIP tokenizer files") as e:
        MPSGuidance(checkpoint=ckpt, processor=str(no_tokenizer))
    one_line_error(e)


@pytest.mark.slow
def test_mps_doodl_fit_through_the_cli(mps_files, tiny_pipeline_dir, write_config, tmp_path):
    """Slow (a full cli.py fit). Fast twins: the optimisation in test_mps_gradients_optimisation_and_batch_independence
    and experiments/sd15/mps.yaml parsed by test_configs."""
    from cli import main

    guidance = [{"class_path": "doodl_lightning.guidance.MPSGuidance",
                 "init_args": {"checkpoint": str(mps_files["checkpoint"]), "processor": str(mps_files["processor"])}}]
    out = tmp_path / "fit"
    cfg = write_config(tmp_path / "mps.yaml", tiny_pipeline_dir, out, steps=3, guidance=guidance,
                       prompts=["a red circle"], seeds=[0], update_rule="adam", lr=0.05,
                       callbacks=[{"class_path": "callbacks.ResultsWriter"}])
    cli = main(["fit", "--config", cfg])
    records = [json.loads(x) for x in (out / "lightning_logs/version_0/results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and set(records[0]["final_terms"]) == {"mps"}
    assert records[0]["final_loss"] < records[0]["initial_loss"], records
    assert cli.model.latents.grad is not None and cli.model.latents.grad.abs().sum() > 0
