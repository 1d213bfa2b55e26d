"""Human-preference rewards (HPSv2, PickScore, ImageReward) on tiny random models in each reward's real file
layout, loaded through the same code path as the real checkpoints; scores checked against independent
computations written here. Every test name holds hps, pickscore or imagereward (``-k`` selects them)."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from doodl_lightning.guidance import Guidance, HPSGuidance, ImageRewardGuidance, PickScoreGuidance
from doodl_lightning.guidance.image_reward import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, map_image_reward_keys
from doodl_lightning.testing.tiny import save_tiny_clip, write_tiny_clip_config

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "a blue square", "a photo of a cat"]


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def images(n: int = 2, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_uint8(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth (low-frequency) uint8 image (3, h, w): resampling it barely overshoots, so PIL's clamping
    and uint8 rounding stay small next to the resize itself."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
    return (smooth * 200 + 25).round().to(torch.uint8)


def optimise_pixels(guidance: Guidance, prompts: list[str], size: int = 40, steps: int = 8,
                    lr: float = 0.05) -> tuple[float, float]:
    """Adam on raw pixels; asserts finite, non-zero gradients each step; returns (first, last) loss."""
    pixels = images(1, size, seed=3).requires_grad_(True)
    opt = torch.optim.Adam([pixels], lr=lr)
    losses = []
    for _ in range(steps):
        loss = guidance(pixels, prompts).sum()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(guidance(pixels, prompts).sum().item())
    return losses[0], losses[-1]


def assert_batch_independent(guidance: Guidance, size: int = 40) -> None:
    x = images(3, size, seed=5)
    batch = guidance(x, PROMPTS)
    for i in range(3):
        alone = guidance(x[i:i + 1], PROMPTS[i:i + 1])
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # the same image scores the same wherever it sits and whatever its neighbours
    swapped = guidance(torch.stack([x[2], x[0]]), [PROMPTS[2], PROMPTS[0]])
    assert torch.allclose(swapped, batch[[2, 0]], atol=1e-5, rtol=1e-5)


class _Boom:
    """Unpickling this calls open(path, "w"): proof of arbitrary code execution if it ever runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_evil(path, marker) -> str:
    path.write_bytes(pickle.dumps({"state_dict": _Boom(str(marker))}))
    return str(path)


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# ================================================================ HPS

@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A tiny open_clip config (stem = model name) + its random weights saved as HPSv2's files are:
    torch.save({'state_dict': ...}) (and a bare state dict as .safetensors)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hps")
    config = write_tiny_clip_config(folder, name="tiny_hps_test")
    state = save_tiny_clip(config, folder / "bare.safetensors", seed=1)
    torch.save({"state_dict": state}, folder / "HPS_v2_compressed.pt")
    save_file(state, str(folder / "bare.safetensors"))
    return {"config": str(config), "pt": str(folder / "HPS_v2_compressed.pt"),
            "safetensors": str(folder / "bare.safetensors"), "state": state}


@pytest.fixture(scope="module")
def hps(hps_files):
    return HPSGuidance(checkpoint=hps_files["pt"], model_config=hps_files["config"])


def test_hps_score_is_100_cosine_of_open_clip_embeddings(hps, hps_files):
    """Independent: open_clip's own model with the file's weights, normalised by hand, at the input size."""
    import open_clip

    open_clip.add_model_config(hps_files["config"])
    model = open_clip.create_model("tiny_hps_test", pretrained=None).eval()
    model.load_state_dict(hps_files["state"])
    tokenizer = open_clip.get_tokenizer("tiny_hps_test")
    x = images(2, 32)  # the model's input size: no resize
    with torch.no_grad():
        image = F.normalize(model.encode_image(((x + 1) / 2 - CLIP_MEAN) / CLIP_STD), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(PROMPTS[:2])), dim=-1)
        expected = 100 * (image * text).sum(-1)
        assert torch.allclose(hps.score(x, PROMPTS[:2]), expected, atol=1e-4)
        assert torch.allclose(hps(x, PROMPTS[:2]), -expected, atol=1e-4)
    assert hps.name == "hps" and not any(p.requires_grad for p in hps.parameters())


def test_hps_bare_safetensors_state_dict_loads_the_same(hps, hps_files):
    bare = HPSGuidance(checkpoint=hps_files["safetensors"], model_config=hps_files["config"], weight=2.0, name="h")
    x = images(2, 40)
    assert (bare.name, bare.weight) == ("h", 2.0)
    assert torch.allclose(bare(x, PROMPTS[:2]), hps(x, PROMPTS[:2]), atol=1e-6)


@pytest.mark.parametrize("hw", [(48, 48), (48, 24), (20, 36)])
def test_hps_preprocess_is_hpsv2_resize_max_size(hps, hw):
    """HPSv2's evaluation transform on a [0, 1] tensor: torchvision bicubic resize of the longer side, zero pad."""
    import torchvision.transforms.functional as TF

    x = images(1, hw, seed=2)
    h, w = hw
    scale = 32 / max(h, w)
    new = (round(h * scale), round(w * scale))
    ref = TF.resize((x + 1) / 2, list(new), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = 32 - new[0], 32 - new[1]
    ref = TF.pad(ref, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    assert torch.allclose(hps.preprocess(x), (ref - CLIP_MEAN) / CLIP_STD, atol=1e-5)


def test_hps_gradients_optimisation_and_batch_independence(hps):
    first, last = optimise_pixels(hps, ["a red circle"])
    assert last < first
    assert_batch_independent(hps)
    with pytest.raises(ValueError, match="one prompt per image"):
        hps(images(2))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hps_bad_files_fail_in_one_line(hps_files, tmp_path):
    cfg = hps_files["config"]
    with pytest.raises(FileNotFoundError, match="missing.pt") as e:
        HPSGuidance(checkpoint=str(tmp_path / "missing.pt"), model_config=cfg)
    one_line_error(e)
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"evil\.pt.*arbitrary pickled objects are refused") as e:
        HPSGuidance(checkpoint=write_evil(tmp_path / "evil.pt", marker), model_config=cfg)
    one_line_error(e)
    assert not marker.exists()
    wrong = dict(hps_files["state"])
    wrong["text_projection"] = torch.zeros(5, 7)
    torch.save({"state_dict": wrong}, tmp_path / "shapes.pt")
    with pytest.raises(ValueError, match=r"shapes\.pt.*wrong shapes \(1\): text_projection \(5, 7\)") as e:
        HPSGuidance(checkpoint=str(tmp_path / "shapes.pt"), model_config=cfg)
    one_line_error(e)
    torch.save({"weight": torch.zeros(1, 16)}, tmp_path / "aesthetic.pt")
    with pytest.raises(ValueError, match=r"aesthetic\.pt.*missing keys") as e:
        HPSGuidance(checkpoint=str(tmp_path / "aesthetic.pt"), model_config=cfg)
    one_line_error(e)
    with pytest.raises(ValueError, match="needs checkpoint"):
        HPSGuidance(model_config=cfg)


# ================================================================ PickScore

@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    """A tiny transformers CLIPModel saved with save_pretrained (safetensors) and, in the same folder, a CLIP
    processor (CLIPImageProcessor config + CLIP BPE tokenizer) as laion/CLIP-ViT-H-14's is saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from doodl_lightning.shapes.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("pickscore") / "PickScore_v1"
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=math.log(50.0),
    )
    CLIPModel(config).save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(str(folder))
    build_clip_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pickscore(pickscore_dir):
    return PickScoreGuidance(model=str(pickscore_dir))


def _reference_pickscore(folder, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The official README's computation with transformers' own CLIPModel methods."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text_inputs = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(pixel_values=pixel_values)
        text_embs = model.get_text_features(**text_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)  # transformers 5 returns an output object
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (image_embs * text_embs).sum(-1)


def _pil_pixel_values(folder, arrays: list[torch.Tensor]) -> torch.Tensor:
    """The processor's PIL pipeline (resize shortest side, centre crop, rescale, normalise) on uint8 images."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(folder))
    pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arrays]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


def test_pickscore_equals_the_readme_computation_at_the_model_size(pickscore, pickscore_dir):
    arrays = [smooth_uint8(32, 32, seed=s) for s in (0, 1)]
    pixel_values = _pil_pixel_values(pickscore_dir, arrays)
    x = torch.stack(arrays).float() / 127.5 - 1
    assert torch.allclose(pickscore.preprocess(x), pixel_values, atol=1e-5)  # resize and crop are identities
    expected = _reference_pickscore(pickscore_dir, pixel_values, PROMPTS[:2])
    with torch.no_grad():
        assert torch.allclose(pickscore.score(x, PROMPTS[:2]), expected, atol=1e-4)
        assert torch.allclose(pickscore(x, PROMPTS[:2]), -expected, atol=1e-4)
    assert pickscore.name == "pickscore" and not any(p.requires_grad for p in pickscore.parameters())


@pytest.mark.parametrize("hw", [(48, 48), (40, 56), (61, 37), (24, 30)])
def test_pickscore_resize_and_crop_match_the_processor(pickscore, pickscore_dir, hw):
    """Other sizes (shrink, enlarge, odd crops): PIL resizes uint8 images and rounds, hence the tolerance."""
    arrays = [smooth_uint8(*hw, seed=4)]
    pixel_values = _pil_pixel_values(pickscore_dir, arrays)
    x = torch.stack(arrays).float() / 127.5 - 1
    ours = pickscore.preprocess(x)
    assert ours.shape == pixel_values.shape == (1, 3, 32, 32)
    assert (ours - pixel_values).abs().max() < 0.03  # 0.03 in normalised units is about 2/255 of a pixel
    expected = _reference_pickscore(pickscore_dir, pixel_values, PROMPTS[:1])
    with torch.no_grad():
        assert torch.allclose(pickscore.score(x, PROMPTS[:1]), expected, atol=0.05)


def test_pickscore_gradients_optimisation_and_batch_independence(pickscore):
    first, last = optimise_pixels(pickscore, ["a red circle"])
    assert last < first
    assert_batch_independent(pickscore)
    with pytest.raises(ValueError, match="one prompt per image"):
        pickscore(images(2), ["only one"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickscore_bad_files_fail_in_one_line(pickscore_dir, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="nowhere") as e:
        PickScoreGuidance(model=str(tmp_path / "nowhere"))
    one_line_error(e)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(pickscore_dir / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no_weights has no weights file") as e:
        PickScoreGuidance(model=str(empty))
    one_line_error(e)
    # A pickle as pytorch_model.bin: transformers reads it weights-only, so it is refused, never run.
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(pickscore_dir / "config.json", evil / "config.json")
    marker = tmp_path / "pwned"
    write_evil(evil / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"evil: its weights file is not a weights-only state dict \(arbitrary pickled "
                                         r"objects are refused\)") as e:
        PickScoreGuidance(model=str(evil), processor=str(pickscore_dir))
    one_line_error(e)
    assert not marker.exists()
    # Weights of another shape than config.json says.
    shapes = tmp_path / "shapes"
    shutil.copytree(pickscore_dir, shapes)
    config = json.loads((shapes / "config.json").read_text())
    config["projection_dim"] = 8
    (shapes / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shapes: weights do not match its config.json: wrong shapes \(2\): ") as e:
        PickScoreGuidance(model=str(shapes))
    one_line_error(e)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(pickscore_dir, no_tokenizer,
                    ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    with pytest.raises(FileNotFoundError, match="no_tokenizer has no CLIP tokenizer files"):
        PickScoreGuidance(model=str(no_tokenizer))
    not_clip = tmp_path / "bert"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (not_clip / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="describes a 'bert' model"):
        PickScoreGuidance(model=str(not_clip))


# ================================================================ ImageReward

IR_VIT = {"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32}
IR_TEXT = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
           "max_position_embeddings": 40}
IR_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "photo", "of",
            "cat", "the", "on", "##s"]
IR_VOCAB = len(IR_WORDS) + 2  # + BLIP's [DEC] and [ENC]


def tiny_image_reward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's ORIGINAL keys (BLIP ViT blocks, med.py BERT, mlp.layers), with the
    extras the real file carries (contrastive projections, the position_ids buffer)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    w, t, inter = IR_VIT["width"], IR_TEXT["hidden_size"], IR_TEXT["intermediate_size"]
    n_tok = (IR_VIT["image_size"] // IR_VIT["patch_size"]) ** 2 + 1
    sd = {"blip.visual_encoder.cls_token": r(1, 1, w), "blip.visual_encoder.pos_embed": r(1, n_tok, w),
          "blip.visual_encoder.patch_embed.proj.weight": r(w, 3, 8, 8, scale=0.05),
          "blip.visual_encoder.patch_embed.proj.bias": r(w)}
    for i in range(IR_VIT["depth"]):
        b = f"blip.visual_encoder.blocks.{i}."
        sd.update({b + "norm1.weight": r(w, base=1.0), b + "norm1.bias": r(w), b + "attn.qkv.weight": r(3 * w, w),
                   b + "attn.qkv.bias": r(3 * w), b + "attn.proj.weight": r(w, w), b + "attn.proj.bias": r(w),
                   b + "norm2.weight": r(w, base=1.0), b + "norm2.bias": r(w), b + "mlp.fc1.weight": r(4 * w, w),
                   b + "mlp.fc1.bias": r(4 * w), b + "mlp.fc2.weight": r(w, 4 * w), b + "mlp.fc2.bias": r(w)})
    sd.update({"blip.visual_encoder.norm.weight": r(w, base=1.0), "blip.visual_encoder.norm.bias": r(w)})
    e = "blip.text_encoder.embeddings."
    sd.update({e + "position_ids": torch.arange(IR_TEXT["max_position_embeddings"])[None],
               e + "word_embeddings.weight": r(IR_VOCAB, t), e + "position_embeddings.weight": r(40, t),
               e + "LayerNorm.weight": r(t, base=1.0), e + "LayerNorm.bias": r(t)})
    for i in range(IR_TEXT["num_hidden_layers"]):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for part, kv_in in (("attention.", t), ("crossattention.", w)):
            sd.update({b + part + "self.query.weight": r(t, t), b + part + "self.query.bias": r(t),
                       b + part + "self.key.weight": r(t, kv_in), b + part + "self.key.bias": r(t),
                       b + part + "self.value.weight": r(t, kv_in), b + part + "self.value.bias": r(t),
                       b + part + "output.dense.weight": r(t, t), b + part + "output.dense.bias": r(t),
                       b + part + "output.LayerNorm.weight": r(t, base=1.0), b + part + "output.LayerNorm.bias": r(t)})
        sd.update({b + "intermediate.dense.weight": r(inter, t), b + "intermediate.dense.bias": r(inter),
                   b + "output.dense.weight": r(t, inter), b + "output.dense.bias": r(t),
                   b + "output.LayerNorm.weight": r(t, base=1.0), b + "output.LayerNorm.bias": r(t)})
    sd.update({"blip.vision_proj.weight": r(16, w), "blip.vision_proj.bias": r(16),
               "blip.text_proj.weight": r(16, t), "blip.text_proj.bias": r(16)})
    dims = [t, 1024, 128, 64, 16, 1]
    for i, (a, b_) in zip([0, 2, 4, 6, 7], zip(dims, dims[1:])):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = r(b_, a, scale=1 / math.sqrt(a)), r(b_)
    return sd


def reference_image_reward(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward's forward written from the original code (BLIP vit.py, med.py, ImageReward.py) in plain torch,
    reading the ORIGINAL keys: an independent check of the key map and of transformers' modules."""
    n, w, heads = pixels.shape[0], IR_VIT["width"], IR_VIT["heads"]

    def lin(x, k):
        return F.linear(x, sd[k + ".weight"], sd[k + ".bias"])

    def ln(x, k, eps):
        return F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps)

    def split(x, h):  # (n, L, D) -> (n, h, L, D / h)
        return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"],
                 stride=IR_VIT["patch_size"])
    x = torch.cat([sd[v + "cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(IR_VIT["depth"]):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        att = (split(q, heads) @ split(k, heads).transpose(-2, -1) * (w // heads) ** -0.5).softmax(-1)
        x = x + lin((att @ split(val, heads)).transpose(1, 2).reshape(x.shape), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    e, th = "blip.text_encoder.", IR_TEXT["num_attention_heads"]
    h = (sd[e + "embeddings.word_embeddings.weight"][ids]
         + sd[e + "embeddings.position_embeddings.weight"][:ids.shape[1]])
    h = ln(h, e + "embeddings.LayerNorm", 1e-12)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's get_extended_attention_mask

    def attention(hidden, states, p, add_mask):
        q, k, val = (split(lin(s, p + "self." + name), th) for s, name in ((hidden, "query"), (states, "key"),
                                                                           (states, "value")))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + add_mask
        ctx = (scores.softmax(-1) @ val).transpose(1, 2).reshape(hidden.shape)
        return ln(lin(ctx, p + "output.dense") + hidden, p + "output.LayerNorm", 1e-12)

    for i in range(IR_TEXT["num_hidden_layers"]):
        b = f"{e}encoder.layer.{i}."
        h = attention(h, h, b + "attention.", extended)
        h = attention(h, image, b + "crossattention.", 0.0)  # image_atts are all ones
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # dropouts in between are off in eval; no activations
        r = lin(r, f"mlp.layers.{i}")
    return ((r - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).squeeze(-1)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """ImageReward.pt (torch.save of the original-layout state dict), med_config.json and a tiny BERT
    vocab.txt, all in one folder as they would be downloaded."""
    folder = tmp_path_factory.mktemp("imagereward")
    state = tiny_image_reward_state()
    torch.save(state, folder / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": IR_VOCAB, "encoder_width": 768,
           "add_cross_attention": True, **IR_TEXT}
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vocab.txt").write_text("\n".join(IR_WORDS) + "\n")
    return {"folder": folder, "checkpoint": str(folder / "ImageReward.pt"), "state": state}


@pytest.fixture(scope="module")
def imagereward(imagereward_files):
    return ImageRewardGuidance(checkpoint=imagereward_files["checkpoint"], vit=IR_VIT)


def test_imagereward_key_map_covers_the_original_layout(imagereward, imagereward_files):
    mapped = map_image_reward_keys(imagereward_files["state"])
    own = imagereward.model.state_dict()
    assert set(mapped) == set(own)  # every weight of the model comes from the file, nothing left over
    assert all(torch.equal(own[k], v) for k, v in mapped.items())
    # dropped: the contrastive projections (4 tensors) and the text position_ids buffer, unused by the score
    assert len(mapped) == len(imagereward_files["state"]) - 5


def test_imagereward_equals_the_reference_forward(imagereward, imagereward_files):
    x = images(3, 32, seed=1)  # the model's input size: resize and crop are identities
    prompts = ["a red circle", "a blue squares on the photo", "cat"]
    tokens = imagereward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (3, 35) and tokens["input_ids"][0, 0].item() == IR_WORDS.index("[CLS]")
    pixels = ((x + 1) / 2 - CLIP_MEAN) / CLIP_STD
    with torch.no_grad():
        expected = reference_image_reward(imagereward_files["state"], pixels, tokens["input_ids"],
                                          tokens["attention_mask"])
        ours = imagereward.score(x, prompts)
    assert expected.std() > 0.05  # the prompts and images give distinct scores: a meaningful comparison
    assert torch.allclose(ours, expected, atol=1e-4), (ours, expected)
    assert torch.allclose(imagereward(x, prompts), -expected, atol=1e-4)
    assert imagereward.name == "image_reward" and not any(p.requires_grad for p in imagereward.parameters())


@pytest.mark.parametrize("hw", [(40, 44), (48, 48), (20, 27), (57, 40)])
def test_imagereward_preprocess_is_its_torchvision_transform(imagereward, hw):
    """Resize(224, BICUBIC) + CenterCrop(224) (here 32) + Normalize, as torchvision does them on a tensor;
    (40, 44) -> 32 x 35: an odd crop margin, where torchvision rounds the offset (int(round(1.5)) = 2)."""
    from torchvision import transforms as T

    x = images(1, hw, seed=6)
    ref = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32)])
    expected = (ref((x + 1) / 2) - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(imagereward.preprocess(x), expected, atol=1e-5)


def test_imagereward_gradients_optimisation_and_batch_independence(imagereward):
    first, last = optimise_pixels(imagereward, ["a red circle"])
    assert last < first
    assert_batch_independent(imagereward)
    with pytest.raises(ValueError, match="one prompt per image"):
        imagereward(images(1))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_imagereward_bad_files_fail_in_one_line(imagereward_files, tmp_path):
    import shutil

    folder = imagereward_files["folder"]
    kw = dict(med_config=str(folder / "med_config.json"), tokenizer=str(folder), vit=IR_VIT)
    with pytest.raises(FileNotFoundError, match="absent.pt") as e:
        ImageRewardGuidance(checkpoint=str(tmp_path / "absent.pt"), **kw)
    one_line_error(e)
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"evil\.pt.*arbitrary pickled objects are refused") as e:
        ImageRewardGuidance(checkpoint=write_evil(tmp_path / "evil.pt", marker), **kw)
    one_line_error(e)
    assert not marker.exists()
    state = dict(imagereward_files["state"])
    state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"] = torch.zeros(24, 1024)  # ViT-L width
    torch.save(state, tmp_path / "shapes.pt")
    with pytest.raises(ValueError, match=r"shapes\.pt.*wrong shapes \(1\): text\.encoder\.layer\.1\.crossattention"
                                         r"\.self\.key\.weight \(24, 1024\) != expected \(24, 32\)") as e:
        ImageRewardGuidance(checkpoint=str(tmp_path / "shapes.pt"), **kw)
    one_line_error(e)
    vit_key = dict(imagereward_files["state"])
    qkv = "blip.visual_encoder.blocks.0.attn.qkv"
    vit_key[qkv + "_proj.weight"] = vit_key.pop(qkv + ".weight")
    torch.save(vit_key, tmp_path / "vit_key.pt")
    with pytest.raises(ValueError, match=r"vit_key\.pt: keys not in ImageReward's layout \(1\): .*qkv_proj") as e:
        ImageRewardGuidance(checkpoint=str(tmp_path / "vit_key.pt"), **kw)
    one_line_error(e)
    renamed = dict(imagereward_files["state"])
    renamed["blip.text_encoder.encoder.layer.0.attention.self.query_proj.weight"] = renamed.pop(
        "blip.text_encoder.encoder.layer.0.attention.self.query.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"renamed\.pt does not match ImageRewardModel: missing keys \(1\): "
                                         r"text\.encoder\.layer\.0\.attention\.self\.query\.weight; "
                                         r"unexpected keys \(1\): .*query_proj") as e:
        ImageRewardGuidance(checkpoint=str(tmp_path / "renamed.pt"), **kw)
    one_line_error(e)
    dropped = {k: v for k, v in imagereward_files["state"].items() if not k.startswith("mlp.layers.7")}
    torch.save(dropped, tmp_path / "dropped.pt")
    with pytest.raises(ValueError, match=r"dropped\.pt.*missing keys \(2\): head\.7\.weight, head\.7\.bias") as e:
        ImageRewardGuidance(checkpoint=str(tmp_path / "dropped.pt"), **kw)
    one_line_error(e)
    torch.save({"layers.0.weight": torch.zeros(1, 16)}, tmp_path / "aesthetic.pt")
    with pytest.raises(ValueError, match=r"aesthetic\.pt: expected ImageReward\.pt's keys"):
        ImageRewardGuidance(checkpoint=str(tmp_path / "aesthetic.pt"), **kw)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(imagereward_files["checkpoint"], lone / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match=r"med_config\.json not found"):
        ImageRewardGuidance(checkpoint=str(lone / "ImageReward.pt"), vit=IR_VIT)
    with pytest.raises(FileNotFoundError, match="lone has no vocab.txt or tokenizer.json"):
        ImageRewardGuidance(checkpoint=str(lone / "ImageReward.pt"), med_config=kw["med_config"], vit=IR_VIT)
    (lone / "vocab.txt").write_text("\n".join(IR_WORDS[:-1]) + "\n")
    with pytest.raises(ValueError, match="has 17 tokens .* vocab_size is 18"):
        ImageRewardGuidance(checkpoint=str(lone / "ImageReward.pt"), med_config=kw["med_config"], vit=IR_VIT)
    with pytest.raises(ValueError, match="unknown vit 'huge'"):
        ImageRewardGuidance(checkpoint=imagereward_files["checkpoint"], vit="huge")


# ================================================================ all three: precision, YAML

def test_hps_pickscore_imagereward_in_bf16_and_float64(hps, pickscore, imagereward):
    """Under bf16-true / 64-true the guidance is cast whole: the images follow, the loss comes back >= float32."""
    import copy

    x = images(2, 40)
    for g in (hps, pickscore, imagereward):
        ref = g(x, PROMPTS[:2])
        for dtype, rtol in ((torch.bfloat16, 0.05), (torch.float64, 1e-5)):
            cast = copy.deepcopy(g).to(dtype)
            pixels = x.clone().requires_grad_(True)
            out = cast(pixels, PROMPTS[:2])
            out.sum().backward()
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert torch.isfinite(pixels.grad).all() and torch.allclose(out.float(), ref, rtol=rtol, atol=rtol)


def test_hps_pickscore_imagereward_build_from_yaml(hps_files, pickscore_dir, imagereward_files):
    from jsonargparse import ArgumentParser

    vit = json.dumps(IR_VIT)
    yaml = f"""
guidance:
  - class_path: doodl_lightning.guidance.HPSGuidance
    init_args:
      checkpoint: {hps_files["pt"]}
      model_config: {hps_files["config"]}
  - class_path: doodl_lightning.guidance.PickScoreGuidance
    init_args:
      model: {pickscore_dir}
      processor: {pickscore_dir}
      weight: 0.5
  - class_path: doodl_lightning.guidance.ImageRewardGuidance
    init_args:
      checkpoint: {imagereward_files["checkpoint"]}
      med_config: {imagereward_files["folder"] / "med_config.json"}
      tokenizer: {imagereward_files["folder"]}
      vit: {vit}
      name: ir
"""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--guidance", type=list[Guidance])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(parser.parse_string(yaml)).guidance
    assert [g.name for g in built] == ["hps", "pickscore", "ir"] and built[1].weight == 0.5
    x = images(2, 40).requires_grad_(True)
    total = sum(g.weight * g(x, PROMPTS[:2], gens(0, 1)) for g in built)
    total.sum().backward()
    assert total.shape == (2,) and torch.isfinite(x.grad).all()
