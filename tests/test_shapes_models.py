"""Every shipped shapes-world model loads through the same loaders as a real checkpoint."""
import json

import pytest
import torch

from doodl_lightning.shapes import ShapesWeights

SW = ShapesWeights()
W = SW.root


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not shipped yet")


def test_sd_shapes_loads_like_stable_diffusion():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d = SW.sd
    _need(d / "model_index.json")
    pipe = StableDiffusionPipeline.from_pretrained(d)
    assert pipe.safety_checker is None
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(d, subfolder="vae")
    te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
    DDIMScheduler.from_pretrained(d, subfolder="scheduler")
    assert unet.config.cross_attention_dim == te.config.hidden_size
    ids = tok(["a red polygon"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = te(ids)[0]
        z = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        eps = unet(z, 500, emb).sample
        img = vae.decode(z / vae.config.scaling_factor).sample
    assert eps.shape == z.shape and img.shape == (1, 3, 32, 32)


def test_shapes_clip_loads_like_open_clip():
    import open_clip

    _need(SW.clip_checkpoint)
    name = SW.register_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(SW.clip_checkpoint))
    tok = open_clip.get_tokenizer(name)
    with torch.no_grad():
        t = model.encode_text(tok(["a red triangle"]))
        i = model.encode_image(torch.zeros(1, 3, 32, 32))
    assert t.shape == i.shape


def test_classifier_spec_and_weights():
    from safetensors.torch import load_file
    import timm

    _need(SW.classifier / "model.safetensors")
    spec, labels = SW.classifier_config(), SW.classifier_labels()
    kind, name = spec["arch"].split(":", 1)
    assert kind == "timm" and labels[0] == "circle" and len(labels) == spec["num_classes"]
    net = timm.create_model(name, pretrained=False, num_classes=spec["num_classes"])
    net.load_state_dict({k: v.float() for k, v in load_file(SW.classifier_kwargs()["checkpoint"]).items()})
    with torch.no_grad():
        assert net(torch.zeros(1, 3, spec["input_size"], spec["input_size"])).shape == (1, spec["num_classes"])


def test_aesthetic_head_is_laion_linear_format():
    from safetensors.torch import load_file

    _need(SW.aesthetic_head)
    sd = load_file(str(SW.aesthetic_head))
    assert set(sd) == {"weight", "bias"} and sd["weight"].shape[0] == 1 and sd["bias"].shape == (1,)
    if SW.clip_config.exists():
        cfg = json.loads(SW.clip_config.read_text())
        assert sd["weight"].shape[1] == cfg["embed_dim"]


def test_evaluator_api():
    from doodl_lightning.shapes.data import make_batch

    _need(SW.evaluator_dir / "model.safetensors")
    ev = SW.evaluator()
    attrs, x, _ = make_batch(99, 4)
    out = ev(x)
    assert set(out) >= {"shape", "colour", "size", "position", "background", "quality"}
    assert out["shape"].shape == (4,) and len(ev.names(out)) == 4


def test_shipped_weights_are_small():
    total = sum(p.stat().st_size for p in W.rglob("*") if p.is_file())
    assert total <= 25 * 2**20
