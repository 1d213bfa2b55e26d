"""Qwen-Image behind the same module, CLI and guarantees as the other families: its own cases (the pipeline's prompt
template and token dropping, true CFG with the norm rescaling, the video-style VAE's normalisation, exact gradients, a
fit and a bit-identical resume through ``cli.py``, bad input). The family contract it inherits by being registered
(save / load round trip, dtype, determinism) runs in test_families.py.

The model is a tiny random ``QwenImagePipeline`` in the released layout (transformer, Qwen2.5-VL text encoder with an
offline Qwen2 tokenizer, AutoencoderKLQwenImage, the released scheduler config), saved with ``save_pretrained`` and
loaded back through the code path of a downloaded one (``doodl_lightning.testing.qwen_image_models``). The reference
is diffusers' own QwenImagePipeline (and QwenImageImg2ImgPipeline for encoding images), run from the same noise.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli import main, run_cli
from doodl_lightning.families import REGISTRY, PretrainedQwenImageBackbone, resolve_backbone
from doodl_lightning.families.flux_layout import pack_latents, unpack_latents
from doodl_lightning.families.qwen_image import MASK, PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, TOKENIZER_MAX_LENGTH
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.sampling import relative_error, sample, sample_flow
from doodl_lightning.testing import families as F

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"  # built once per session (test_families too)
    return {"path": F.tiny_model("qwen-image", shared), "tmp": tmp_path_factory.mktemp("qwen_image")}


@functools.lru_cache(maxsize=None)
def _pipeline(path: str):
    """diffusers' QwenImagePipeline of the saved tiny model (the reference), loaded once."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def _backbone(path: str):
    """Our backbone of the saved tiny model through the registry, loaded once (float32; its users do not cast it)."""
    return resolve_backbone(path)


def test_qwen_image_conditioning_is_the_pipelines_encode_prompt(qwen):
    """The template, its 34 dropped tokens and the 1024-token limit are the pipeline's; the tiny tokenizer spells the
    template's prefix in exactly those 34 tokens; the text states (one prompt, a batch with its mask, a shorter
    max_sequence_length) are QwenImagePipeline.encode_prompt's, zero-padded with the real tokens masked;
    ``encode_images`` is QwenImageImg2ImgPipeline's normalised posterior sample."""
    from diffusers import QwenImageImg2ImgPipeline

    path = qwen["path"]
    pipe, bb = _pipeline(path), _backbone(path)
    assert type(bb) is PretrainedQwenImageBackbone and REGISTRY["QwenImagePipeline"] is PretrainedQwenImageBackbone
    assert (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length) == \
        (PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, TOKENIZER_MAX_LENGTH)
    ids = pipe.tokenizer(PROMPT_TEMPLATE.format(PROMPT)).input_ids
    assert pipe.tokenizer.decode(ids[:PROMPT_TEMPLATE_DROP]).endswith("<|im_start|>user\n")
    assert pipe.tokenizer.decode(ids[PROMPT_TEMPLATE_DROP:]).startswith(PROMPT + "<|im_end|>")

    cond = bb.encode_prompts([PROMPT])
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(PROMPT, max_sequence_length=512)
    n = ref.shape[1]
    assert ref_mask is None and cond.hidden.shape == (1, 512, 16) and n == 3 + 5  # the prompt + <|im_end|>\n...\n
    assert torch.equal(cond.hidden[:, :n], ref) and not cond.hidden[:, n:].any()
    assert cond.added[MASK][0, :n].all() and not cond.added[MASK][0, n:].any()

    two = bb.encode_prompts([PROMPT, "blurry"])  # a batch padded to its longest, as the pipeline's
    with torch.no_grad():
        ref2, mask2 = pipe.encode_prompt([PROMPT, "blurry"], max_sequence_length=512)
    n2 = ref2.shape[1]
    assert torch.allclose(two.hidden[:, :n2], ref2, atol=1e-6) and torch.equal(two.added[MASK][:, :n2], mask2)
    assert mask2.sum(1).tolist() == [8, 11] and not two.hidden[:, n2:].any()  # "blurry": 6 byte tokens + 5

    short = PretrainedQwenImageBackbone(path, max_sequence_length=4).encode_prompts([PROMPT])
    with torch.no_grad():
        ref4, _ = pipe.encode_prompt(PROMPT, max_sequence_length=4)
    assert short.hidden.shape == ref4.shape == (1, 4, 16) and torch.equal(short.hidden, ref4)

    images = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    img2img = QwenImageImg2ImgPipeline(**pipe.components)
    with torch.no_grad():
        ref_z = img2img._encode_vae_image(images[:, :, None], [torch.Generator().manual_seed(5)])[:, :, 0]
    z = bb.encode_images(images, generators=[torch.Generator().manual_seed(5)])
    assert z.shape == (1, 16, 8, 16) and torch.allclose(z, ref_z, atol=1e-6)


# (true_cfg_scale, negative prompt (None: the pipeline gets none), steps, (height, width)): true CFG with a negative
# of another length than the prompt (a masked batched call), the unguided chain, and the empty negative
PARITY = {
    "qwen-cfg-nonsquare": (4.0, "blurry", 3, (16, 32)),
    "qwen-unguided": (1.0, None, 2, (16, 16)),
    "qwen-cfg-empty-negative": (3.0, "", 2, (32, 16)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_qwen_image_chain_equals_the_diffusers_pipeline(qwen, case):
    """From the same initial noise, our chain (the module's latents, conditioning, velocity and schedule) ends where
    QwenImagePipeline ends (``output_type="latent"``, packed), and our decode is its image (``output_type="pt"``).
    With CFG, the negative prompt's velocity alone (``unconditional_velocity``) is the pipeline's unguided chain of the
    negative prompt, and plain CFG without the pipeline's norm rescaling ends elsewhere: the rescaling is really tested."""
    g, negative, steps, (h, w) = PARITY[case]
    bb, pipe = _backbone(qwen["path"]), _pipeline(qwen["path"])
    m = DOODL(model=bb, prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=g, negative_prompt=negative or "",
              height=h, width=w, guidance=[SymmetryGuidance()]).prepare()
    assert m.hparams.sampler == "flow" and m.latent_shape == (16, h // 2, w // 2)
    x = m.latents.detach()[:, 0]
    with torch.no_grad():
        ours = sample_flow(m.chain.denoiser([0]), x, m.chain.schedule)
        image = (m.backbone.decode(ours) / 2 + 0.5).clamp(0, 1)
    kw = dict(negative_prompt=negative, true_cfg_scale=g, num_inference_steps=steps, height=h, width=w,
              max_sequence_length=bb.max_sequence_length)
    ref = unpack_latents(pipe(PROMPT, latents=pack_latents(x), output_type="latent", **kw).images, h // 2, w // 2)
    ref_image = pipe(PROMPT, latents=pack_latents(x), output_type="pt", **kw).images
    assert ours.shape == ref.shape and (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    assert image.shape == ref_image.shape == (1, 3, h, w) and (image - ref_image).abs().max() <= 1e-5
    if g > 1:
        # the negative prompt's velocity alone (the one-step baseline's branch) is the pipeline's unguided chain of it
        v_n = bb.unconditional_velocity(m.chain.uncond, g)
        with torch.no_grad():
            neg = sample_flow(v_n, x, m.chain.schedule)
        kw.update(negative_prompt=None, true_cfg_scale=1.0)
        ref_neg = unpack_latents(pipe(negative, latents=pack_latents(x), output_type="latent", **kw).images, h // 2, w // 2)
        assert (neg - ref_neg).abs().max() <= 1e-5 * ref_neg.abs().max()
        # plain CFG of the two unguided velocities, without the norm rescaling: another chain
        v_c = bb.denoiser(m.chain.cond, None, 1.0)
        with torch.no_grad():
            plain = sample_flow(lambda z, t: v_n(z, t) + g * (v_c(z, t) - v_n(z, t)), x, m.chain.schedule)
        assert (plain - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("sampler", ["flow", "flow_edict"])
def test_qwen_image_checkpoint_and_reversible_equal_autograd_in_float64(qwen, sampler):
    """Through the backbone's velocity (batched masked true CFG, norm rescaling, packing) and its VAE decode, the
    checkpoint (and for the coupled chain, reversible) gradients equal plain autograd's in float64."""
    bb = PretrainedQwenImageBackbone(qwen["path"], max_sequence_length=8).to(torch.float64)
    v = bb.denoiser(bb.encode_prompts([PROMPT, "a blue square"]), bb.encode_negative("blurry"), 4.0)
    schedule = bb.schedule(2, size=(16, 16))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *bb.latent_shape(16)), generator=gen, dtype=torch.float64)
    w = torch.randn((2, 3, 16, 16), generator=gen, dtype=torch.float64)

    def grad(backprop):
        z = x.clone().requires_grad_()
        finals = sample(v, z, schedule, sampler=sampler, backprop=backprop)
        sum((bb.decode(f) * w).sum() + (f ** 2).sum() for f in finals).backward()
        return z.grad

    ref = grad("autograd")
    assert ref.abs().max() > 0 and torch.allclose(grad("checkpoint"), ref, rtol=1e-12, atol=1e-14)
    if sampler == "flow_edict":  # VJPs at the inputs rebuilt by the exact inverse: float64 rounding only
        assert relative_error(grad("reversible"), ref) < 1e-8


def qwen_config(write_config, path: Path, model, out: Path, iterations: int, **keys) -> str:
    """``write_config`` for the tiny Qwen-Image: ``iterations`` optimisation steps of a 2-step chain at 16 x 16 px,
    true CFG 4 on the negative "blurry", adam at lr 0.1 (the other families' fit tests' update)."""
    cfg = write_config(path, model, out, steps=iterations, **{"height": 16, "width": 16, "update_rule": "adam",
                                                               "lr": 0.1, "guidance_scale": 4.0,
                                                               "negative_prompt": "blurry", "prompts": [PROMPT],
                                                               "seeds": [0, 1], **keys})
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = 2
    Path(cfg).write_text(yaml.safe_dump(data))
    return cfg


def test_qwen_image_doodl_fit_through_the_cli_and_resume_is_bit_identical(qwen, write_config):
    """A DOODL fit through ``cli.py`` (model: <path>: the registry picks the backbone) lowers the loss with the
    transformer's calls counted per image (CFG's two rows one evaluation); 1 step with checkpoints, resumed from
    last.ckpt to 2, ends bit for bit where the uninterrupted 2-step fit ends."""
    tmp = qwen["tmp"]

    def cfg(name, iterations):
        return qwen_config(write_config, tmp / f"{name}.yaml", qwen["path"], tmp / name, iterations)

    first = main(["fit", "--config", cfg("resume", 1)])
    ckpt = tmp / "resume/lightning_logs/version_0/checkpoints/last.ckpt"
    assert first.trainer.global_step == 1 and ckpt.is_file()
    resumed = main(["fit", "--config", cfg("resume", 2), "--ckpt_path", str(ckpt)])
    full = main(["fit", "--config", cfg("full", 2)])
    assert type(full.model.backbone) is PretrainedQwenImageBackbone and full.model.latent_shape == (16, 8, 8)
    assert resumed.trainer.global_step == full.trainer.global_step == 2
    assert torch.equal(resumed.model.latents, full.model.latents)
    assert not torch.equal(first.model.latents, full.model.latents)
    run = tmp / "full/lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert np.mean([r["final_loss"] for r in records]) < np.mean([r["initial_loss"] for r in records])
    # 2 iterations x 2 steps x (forward + checkpoint recomputation) + the final evaluation's 2
    assert json.loads((run / "compute.json").read_text())["unet_evaluations_per_image"] == 2 * 2 * 2 + 2


def test_qwen_image_bad_input_is_one_line_and_writes_nothing(qwen, write_config, capsys):
    """Through ``cli.py``: an option the Qwen-Image VAE cannot honour is one line, exit 2, no output directory. The
    backbone's other refusals are the same kind of one line (the CLI prints a ValueError's message as it is)."""
    tmp = qwen["tmp"]
    out = tmp / "bad_vae_checkpointing"
    cfg = write_config(tmp / "bad_vae_checkpointing.yaml", qwen["path"], out, vae_checkpointing=True, height=16, width=16)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "error: vae_checkpointing: diffusers' AutoencoderKLQwenImage has no gradient checkpointing: drop "
        "vae_checkpointing (vae_tiling lowers the decoder's memory instead)")
    assert not out.exists()
    bb = _backbone(qwen["path"])
    for call, expected in (
        (lambda: bb.latent_shape(16, 18), "width 18 is not a positive multiple of 4: the VAE downsamples by 2 and "
                                          "Qwen-Image packs 2x2 latent patches; use e.g. 16"),
        (lambda: bb.check_sampler("ddim"), "sampler 'ddim' needs a diffusion (noise-prediction) model; Qwen-Image is a "
                                           "rectified-flow model: use sampler flow (Euler, its pipeline's) or flow_edict "
                                           "(exactly invertible), or leave sampler unset"),
        (lambda: bb.schedule(2, "official"), "timestep_grid 'official' is a DDIM grid; Qwen-Image samples on its "
                                             "pipeline's flow-matching grid: drop timestep_grid (or set it to model)"),
        (lambda: PretrainedQwenImageBackbone(qwen["path"], max_sequence_length=1025),
         "max_sequence_length must be in [1, 1024] (Qwen-Image prompt tokens), got 1025"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == expected
