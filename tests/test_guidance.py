"""Guidance modules on tiny models built from configs: no downloads, a few seconds in all."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from doodl_lightning.guidance import (
    AestheticGuidance,
    ClassifierGuidance,
    CLIPImageGuidance,
    CLIPTextGuidance,
    Cutouts,
    Guidance,
    SymmetryGuidance,
    spherical_dist_loss,
)
from doodl_lightning.testing.tiny import TINY_CLIP_CONFIG

EMBED_DIM = TINY_CLIP_CONFIG["embed_dim"]


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def images(n: int = 2, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def optimise_pixels(guidance: Guidance, steps: int = 15, lr: float = 0.05, **kwargs) -> tuple[float, float]:
    """Adam on raw pixels with fixed cutouts (fresh generators each step); returns (first, last) loss."""
    pixels = images(1, 36).requires_grad_(True)
    opt = torch.optim.Adam([pixels], lr=lr)
    losses = []
    for _ in range(steps):
        loss = guidance(pixels, generators=gens(7), **kwargs).sum()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(guidance(pixels, generators=gens(7), **kwargs).sum().item())
    return losses[0], losses[-1]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory, tiny_clip):
    """The tiny open_clip config + its seeded random weights as .safetensors and as a torch .pt."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_clip.weights))
    pt = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(state, pt)
    return {"config": str(tiny_clip.config), "safetensors": str(tiny_clip.weights), "pt": str(pt), "state": state}


@pytest.fixture(scope="module")
def text_guidance(clip_files):
    return CLIPTextGuidance(pretrained=clip_files["safetensors"], model_config=clip_files["config"], num_cuts=4)


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """Reference images in awkward formats: grayscale odd size, RGBA, palette, RGB."""
    folder = tmp_path_factory.mktemp("refs")
    g = torch.Generator().manual_seed(1)
    def arr(h, w, c):
        return (torch.rand(h, w, c, generator=g) * 255).to(torch.uint8).squeeze(-1).numpy()
    Image.fromarray(arr(17, 23, 1), "L").save(folder / "a_gray.png")
    Image.fromarray(arr(40, 31, 4), "RGBA").save(folder / "b_rgba.png")
    Image.fromarray(arr(50, 50, 3), "RGB").convert("P").save(folder / "c_palette.png")
    Image.fromarray(arr(33, 64, 3), "RGB").save(folder / "d_rgb.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---------------------------------------------------------------- cutouts

@pytest.mark.parametrize("hw", [(40, 40), (17, 29), (8, 8), (64, 20)])
@pytest.mark.parametrize("num_cuts", [0, 3])
def test_cutouts_shape_any_input_size(hw, num_cuts):
    out = Cutouts(16, num_cuts)(torch.rand(2, 3, *hw), gens(0, 1))
    assert out.shape == (2 * max(num_cuts, 1), 3, 16, 16)


def test_cutouts_differentiable():
    x = torch.rand(1, 3, 10, 9, dtype=torch.float64, requires_grad=True)
    # Fresh generators per call: the same crops each evaluation, so the map is a fixed differentiable function.
    assert torch.autograd.gradcheck(lambda t: Cutouts(4, num_cuts=3)(t, gens(3)), (x,))


def test_cutouts_deterministic_for_seed():
    x = torch.rand(1, 3, 48, 48)
    cut = Cutouts(16, num_cuts=8)
    assert torch.equal(cut(x, gens(5)), cut(x, gens(5)))
    assert not torch.equal(cut(x, gens(5)), cut(x, gens(6)))
    assert torch.equal(cut(x), cut(x))  # no generators: a fixed default seed


def test_cutouts_independent_of_batch_composition():
    x = torch.rand(3, 3, 48, 48)
    cut = Cutouts(16, num_cuts=5)
    batch = cut(x, gens(10, 11, 12))
    alone = cut(x[1:2], gens(11))
    assert torch.equal(batch[5:10], alone)


def test_cutouts_needs_one_generator_per_item():
    with pytest.raises(ValueError, match="one per image"):
        Cutouts(16, 2)(torch.rand(2, 3, 20, 20), gens(0))


def test_cutouts_pool_by_default_and_refuse_an_unknown_resample():
    # a crop smaller than cut_size: the official adaptive_avg_pool2d repeats pixels, bilinear interpolates
    x = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    pooled = Cutouts(48, num_cuts=2, cut_power=1e-9)(x, gens(0))
    assert torch.equal(pooled, F.adaptive_avg_pool2d(x, 48).expand(2, -1, -1, -1))
    assert not torch.allclose(Cutouts(48, 2, 1e-9, resample="bilinear")(x, gens(0)), pooled, atol=1e-3)
    with pytest.raises(ValueError, match="unknown cutout resample 'nearest'"):
        Cutouts(16, resample="nearest")


def test_cutout_sizes_follow_cut_power():
    # cut_power -> 0 makes rand**cut_power -> 1: every crop is the whole (square) image.
    x = torch.rand(1, 3, 24, 24)
    out = Cutouts(24, num_cuts=4, cut_power=1e-9)(x, gens(0))
    assert torch.allclose(out, x.expand(4, -1, -1, -1))


# ---------------------------------------------------------------- base + symmetry

def test_guidance_frozen_eval_and_out_of_checkpoints(text_guidance):
    assert not any(p.requires_grad for p in text_guidance.parameters())
    holder = torch.nn.Module()
    holder.latents = torch.nn.Parameter(torch.zeros(2))
    holder.guidance = text_guidance
    holder.train()
    assert not text_guidance.training and not any(m.training for m in text_guidance.modules())
    state = holder.state_dict()
    assert list(state) == ["latents"]  # frozen guidance weights never go into checkpoints
    holder.load_state_dict(state, strict=True)
    assert text_guidance.name == "clip_text" and text_guidance.weight == 1.0


def test_symmetry():
    g = SymmetryGuidance(weight=2.0, name="sym")
    assert (g.name, g.weight) == ("sym", 2.0)
    x = images(2)
    assert torch.allclose(g(x + x.flip(-1)), torch.zeros(2))
    first, last = optimise_pixels(g)
    assert last < first


class _Probe(Guidance):
    """A one-weight guidance that records the dtype its ``loss`` receives."""

    def __init__(self):
        super().__init__(name="probe")
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.dtype] = []
        self.freeze()

    def loss(self, images, prompts, generators):
        self.seen.append(images.dtype)
        return (images * self.scale).flatten(1).mean(1)


@pytest.mark.parametrize("model_dtype,image_dtype,out_dtype", [
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float64, torch.float32, torch.float64),
    (torch.float32, torch.float64, torch.float32),
])
def test_base_casts_images_to_the_guidance_dtype_and_widens_the_loss(model_dtype, image_dtype, out_dtype):
    g = _Probe().to(model_dtype)
    x = images(2).to(image_dtype).requires_grad_(True)
    out = g(x)
    assert g.seen == [model_dtype] and out.dtype == out_dtype and out.shape == (2,)
    out.sum().backward()
    assert x.grad.dtype == image_dtype and torch.isfinite(x.grad).all()  # gradients flow back through the cast


def test_base_without_weights_keeps_the_image_dtype():
    g = SymmetryGuidance()
    assert g(images(2).double()).dtype == torch.float64
    assert g(images(2).bfloat16()).dtype == torch.float32


def test_guidance_without_loss_is_abstract():
    class NoLoss(Guidance):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoLoss()


# ---------------------------------------------------------------- CLIP text

def test_spherical_dist_loss():
    a = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(spherical_dist_loss(a, a), torch.zeros(1))
    # Orthogonal unit vectors: angle pi/2, and 2 * arcsin(|a-b|/2)**2 = (angle**2) / 2.
    assert torch.allclose(spherical_dist_loss(a, torch.tensor([[0.0, 3.0]])), torch.tensor([torch.pi**2 / 8]))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_clip_local_checkpoint_round_trip(clip_files, fmt):
    g = CLIPTextGuidance(pretrained=clip_files[fmt], model_config=clip_files["config"], num_cuts=0)
    loaded = g.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in clip_files["state"].items())
    # The loss is the spherical distance of the model's own normalised embeddings.
    x = images(2, 32)
    pixels = ((x + 1) / 2 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        image = F.normalize(g.model.encode_image(pixels), dim=-1)
        text = F.normalize(g.model.encode_text(g.tokenizer(prompts)), dim=-1)
        expected = 2 * ((image - text).norm(dim=-1) / 2).arcsin() ** 2
        assert torch.allclose(g(x, prompts), expected, atol=1e-6)


def test_clip_text_prompt_choice(clip_files, text_guidance):
    x = images(2)
    by_prompt = text_guidance(x, ["a cat", "a dog"], gens(0, 1))
    fixed = CLIPTextGuidance(pretrained=clip_files["safetensors"], model_config=clip_files["config"],
                             prompt="a cat", num_cuts=4)
    # A fixed guidance prompt overrides the diffusion prompts.
    assert torch.allclose(fixed(x, ["x", "y"], gens(0, 1))[0], by_prompt[0])
    with pytest.raises(ValueError, match="one prompt per image"):
        text_guidance(x)


def test_clip_text_loss_independent_of_batch(text_guidance):
    x = images(3)
    batch = text_guidance(x, ["a", "b", "c"], gens(1, 2, 3))
    alone = text_guidance(x[2:], ["c"], gens(3))
    assert torch.allclose(batch[2:], alone, atol=1e-6)


def test_clip_text_in_bf16(clip_files):
    g = CLIPTextGuidance(pretrained=clip_files["safetensors"], model_config=clip_files["config"], num_cuts=2)
    x = images(2).requires_grad_(True)
    ref = g(x, ["a", "b"], gens(0, 1))
    low = g.to(torch.bfloat16)(x, ["a", "b"], gens(0, 1))
    low.sum().backward()
    assert low.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert torch.allclose(low, ref, rtol=0.05)


def test_clip_text_optimisation_lowers_loss(text_guidance):
    first, last = optimise_pixels(text_guidance, prompts=["a red circle"])
    assert last < first


class _Boom:
    """Unpickling this calls open(path, "w"): proof of arbitrary code execution if it ever runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_clip_loading_errors(clip_files, tmp_path):
    cfg = clip_files["config"]
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        CLIPTextGuidance(pretrained=str(tmp_path / "missing.safetensors"), model_config=cfg)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CLIPTextGuidance(model_config=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="not-a-model"):
        CLIPTextGuidance(model_name="not-a-model")
    with pytest.raises(ValueError, match="neither a file nor an open_clip pretrained tag"):
        CLIPTextGuidance(model_config=cfg, pretrained="no_such_tag")
    # A pickled arbitrary object is refused, never unpickled: its side effect (creating a file) never runs.
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    evil.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ValueError, match="evil.pt: not a weights-only state dict"):
        CLIPTextGuidance(pretrained=str(evil), model_config=cfg)
    assert not marker.exists()
    # Wrong keys: a checkpoint of another architecture.
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file
    save_file({"visual.proj": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ValueError, match="wrong.safetensors"):
        CLIPTextGuidance(pretrained=str(wrong), model_config=cfg)


# ---------------------------------------------------------------- CLIP image

def test_clip_image_target_invariant_to_reference_order(clip_files, reference_folder):
    kw = dict(pretrained=clip_files["safetensors"], model_config=clip_files["config"], num_cuts=2)
    files = sorted(str(p) for p in reference_folder.iterdir() if p.suffix != ".txt")
    with pytest.warns(UserWarning, match=r"skipping grayscale reference image .*a_gray\.png"):
        a = CLIPImageGuidance(references=files, **kw)
    b = CLIPImageGuidance(references=files[::-1], **kw)
    c = CLIPImageGuidance(references=str(reference_folder), **kw)
    # the .txt file is not an image; the grayscale one is skipped as the official DOODL skips it (RGBA, palette kept)
    assert [Path(r).name for r in c.references] == ["b_rgba.png", "c_palette.png", "d_rgb.jpg"]
    assert torch.allclose(a.target, b.target, atol=1e-6) and torch.allclose(a.target, c.target, atol=1e-6)
    assert torch.allclose(a.target.norm(), torch.tensor(1.0))
    first, last = optimise_pixels(a)
    assert last < first


def test_clip_image_errors(clip_files, tmp_path):
    kw = dict(pretrained=clip_files["safetensors"], model_config=clip_files["config"])
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        CLIPImageGuidance(references=[str(tmp_path / "ghost.png")], **kw)
    with pytest.raises(FileNotFoundError, match="no reference images"):
        CLIPImageGuidance(references=str(tmp_path), **kw)
    with pytest.raises(ValueError, match="needs references"):
        CLIPImageGuidance(**kw)
    Image.new("L", (8, 8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="every reference image for prompt 'a' is grayscale.*RGB"):
        CLIPImageGuidance(references={"a": [str(tmp_path / "gray.png")]}, **kw)
    with pytest.raises(ValueError, match="unknown cutout_reduction 'median'"):
        CLIPImageGuidance(references=str(tmp_path), cutout_reduction="median", **kw)


def test_clip_image_per_prompt_references_match_single_sets(clip_files, reference_folder):
    kw = dict(pretrained=clip_files["safetensors"], model_config=clip_files["config"], num_cuts=2)
    files = sorted(str(p) for p in reference_folder.iterdir() if p.suffix != ".txt")
    sets = {"a red circle": files[:2], "a blue square": str(reference_folder), "a star": files[3]}
    per = CLIPImageGuidance(references=sets, **kw)
    assert per.index == {"a red circle": 0, "a blue square": 1, "a star": 2} and per.target is None
    assert per.targets.shape == (3, EMBED_DIM) and len(per.references["a blue square"]) == 3  # grayscale skipped
    singles = {p: CLIPImageGuidance(references=r, **kw) for p, r in sets.items()}
    for p, single in singles.items():  # each set's target is exactly the single-set guidance's
        assert torch.allclose(per.targets[per.index[p]], single.target, atol=1e-6)
    x = images(4)
    prompts = ["a star", "a red circle", "a star", "a blue square"]
    loss = per(x, prompts, gens(0, 1, 2, 3))
    expected = torch.cat([singles[p](x[i:i + 1], generators=gens(i)) for i, p in enumerate(prompts)])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, singles["a star"](x, generators=gens(0, 1, 2, 3)), atol=1e-4)
    with pytest.raises(ValueError, match="prompt 'a cat' is not in references.*add 'a cat'"):
        per(x[:1], ["a cat"], gens(0))
    with pytest.raises(ValueError, match="one prompt per image"):
        per(x[:1])
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        CLIPImageGuidance(references={"a": files[:1], "b": [str(reference_folder / "ghost.png")]}, **kw)


def test_clip_image_embed_images_is_the_whole_image_embedding(clip_files, reference_folder):
    g = CLIPImageGuidance(pretrained=clip_files["safetensors"], model_config=clip_files["config"],
                          references=str(reference_folder), num_cuts=0)
    x = images(3, 37)
    with torch.no_grad():
        emb = g.embed_images(x)
        assert emb.shape == (3, EMBED_DIM) and torch.allclose(emb, g.encoder(x)[:, 0], atol=1e-6)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-6)


# ---------------------------------------------------------------- aesthetic

def _expected_features(g: AestheticGuidance, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return g.encoder(x)[:, 0]  # num_cuts=0: one resized view per item


def test_aesthetic_linear_head_known_weights(clip_files, tmp_path):
    w = torch.linspace(-1, 1, EMBED_DIM)[None]
    torch.save({"weight": w, "bias": torch.tensor([5.0])}, tmp_path / "linear.pth")
    g = AestheticGuidance(model_name="unused", pretrained=clip_files["safetensors"], model_config=clip_files["config"],
                          head=str(tmp_path / "linear.pth"), num_cuts=0)
    x = images(2, 32)
    features = _expected_features(g, x)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2))
    expected = features @ w[0] + 5.0
    assert torch.allclose(g.score(x), expected, atol=1e-6)
    assert torch.allclose(g(x), -expected, atol=1e-6)
    g.target = 4.0
    assert torch.allclose(g(x), (expected - 4.0).abs(), atol=1e-6)


def test_aesthetic_mlp_head_safetensors(clip_files, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    dims = [EMBED_DIM, 12, 8, 6, 4, 1]  # the improved predictor is 768-1024-128-64-16-1, Linears at 0,2,4,6,7
    linears = [torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
    state = {}
    for i, lin in zip([0, 2, 4, 6, 7], linears):
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = lin.weight.detach(), lin.bias.detach()
    save_file(state, str(tmp_path / "mlp.safetensors"))
    g = AestheticGuidance(pretrained=clip_files["safetensors"], model_config=clip_files["config"],
                          head=str(tmp_path / "mlp.safetensors"), target=3.0, num_cuts=0)
    x = images(2, 32)
    expected = _expected_features(g, x)
    with torch.no_grad():
        for lin in linears:  # no activations in the improved predictor
            expected = lin(expected)
    assert torch.allclose(g.score(x), expected[:, 0], atol=1e-5)
    # this random head scores outside the official [1, 10], where the clipped loss is flat: optimise unclipped
    first, last = optimise_pixels(AestheticGuidance(pretrained=clip_files["safetensors"],
                                                    model_config=clip_files["config"], score_clip=None,
                                                    head=str(tmp_path / "mlp.safetensors"), num_cuts=2))
    assert last < first


def test_aesthetic_clips_each_cutouts_score_to_the_official_range(clip_files, tmp_path):
    """doodl.py's ``amodel(features).clip(1, 10).mean()``: a cutout scored outside [1, 10] adds a constant, no gradient."""
    w = torch.linspace(-1, 1, EMBED_DIM)[None]
    x = images(1, 40).requires_grad_(True)
    kw = dict(pretrained=clip_files["safetensors"], model_config=clip_files["config"], num_cuts=6)
    torch.save({"weight": w, "bias": torch.tensor([0.0])}, tmp_path / "probe.pth")
    with torch.no_grad():
        raw = AestheticGuidance(head=str(tmp_path / "probe.pth"), **kw).cutout_scores(x, gens(3))[0]
    # a bias that puts 10 between the middle two cutout scores: the three above it are clipped, the others not
    bias = 10.0 - float(raw.sort().values[2:4].mean())
    torch.save({"weight": w, "bias": torch.tensor([bias])}, tmp_path / "head.pth")
    g = AestheticGuidance(head=str(tmp_path / "head.pth"), **kw)
    assert g.score_clip == (1.0, 10.0)
    scores = g.cutout_scores(x, gens(3))[0]
    over = scores > 10.0
    assert int(over.sum()) == 3
    loss = g(x, generators=gens(3))
    assert torch.allclose(loss, -scores.clamp(1, 10).mean(), atol=1e-6)
    assert torch.allclose(g.score(x, gens(3)), scores.mean(), atol=1e-6)  # the measurement is not clipped
    # as a held-out metric (model.metrics): the raw score, not one that stops at 10
    from doodl_lightning.objective import held_out_metrics
    metric = held_out_metrics([g], x.detach(), ["p"], gens(3))[g.name]
    assert torch.allclose(metric, -scores.mean().detach(), atol=1e-6) and metric < -scores.clamp(1, 10).mean()
    (grad,) = torch.autograd.grad(loss.sum(), x)
    unclipped = AestheticGuidance(head=str(tmp_path / "head.pth"), score_clip=None, **kw)
    grad_kept = torch.autograd.grad(-(scores * ~over).sum() / 6, x)[0]  # only the in-range cutouts' gradient
    assert torch.allclose(grad, grad_kept, atol=1e-7)
    assert not torch.allclose(grad, torch.autograd.grad(unclipped(x, generators=gens(3)).sum(), x)[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"score_clip must be \[low, high\]"):
        AestheticGuidance(head=str(tmp_path / "head.pth"), score_clip=(10.0, 1.0), **kw)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_aesthetic_bad_files(clip_files, tmp_path):
    kw = dict(pretrained=clip_files["safetensors"], model_config=clip_files["config"])
    torch.save({"foo": torch.zeros(1)}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"keys\.pth.*expected"):
        AestheticGuidance(head=str(tmp_path / "keys.pth"), **kw)
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "l14.pth")
    with pytest.raises(ValueError, match=r"768-d features but .* embeds to 16"):
        AestheticGuidance(head=str(tmp_path / "l14.pth"), **kw)
    torch.save({"weight": torch.zeros(2, 16), "bias": torch.zeros(1)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="wrong shapes"):
        AestheticGuidance(head=str(tmp_path / "shape.pth"), **kw)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Boom(str(tmp_path / "pwned"))))
    with pytest.raises(ValueError, match="evil.pth.*arbitrary pickled objects are refused"):
        AestheticGuidance(head=str(tmp_path / "evil.pth"), **kw)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        AestheticGuidance(head=str(tmp_path / "absent.pth"), **kw)


# ---------------------------------------------------------------- classifier

LABELS = ["crow", "Indigo Bunting", "painted_bunting", "robin", "wren"]


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory):
    from safetensors.torch import save_file
    import torchvision
    folder = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=5).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "squeezenet.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, torch.rand(1, 3, 32, 32)).save(str(folder / "squeezenet.ts"))
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return folder


def test_classifier_by_name_and_index_agree(classifier_files):
    kw = dict(arch="torchvision:squeezenet1_1", checkpoint=str(classifier_files / "squeezenet.safetensors"),
              num_classes=5, input_size=32, labels=str(classifier_files / "labels.txt"))
    x = images(2)
    by_index = ClassifierGuidance(target=2, **kw)(x)
    by_name = ClassifierGuidance(target="painted_bunting", **kw)
    assert by_name.target == 2
    assert torch.allclose(by_name(x), by_index)
    assert ClassifierGuidance(target="painted bunting", **kw).target == 2  # case / '_' vs ' ' forgiven
    assert ClassifierGuidance(target="indigo bunting", **kw).target == 1
    with pytest.raises(ValueError, match=r"unknown class 'bluejay'.*labels\.txt"):
        ClassifierGuidance(target="bluejay", **kw)
    with pytest.raises(ValueError, match="out of range"):
        ClassifierGuidance(target=7, **kw)


def test_classifier_torchscript_matches_state_dict(classifier_files):
    x = images(2)
    common = dict(target=1, num_classes=5, input_size=32, num_cuts=2)
    eager = ClassifierGuidance(arch="torchvision:squeezenet1_1",
                               checkpoint=str(classifier_files / "squeezenet.safetensors"), **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = ClassifierGuidance(arch="torchscript", checkpoint=str(classifier_files / "squeezenet.ts"), **common)
    assert torch.allclose(eager(x, generators=gens(0, 1)), script(x, generators=gens(0, 1)), atol=1e-5)


def test_classifier_timm_optimisation_lowers_loss(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    g = ClassifierGuidance(arch="timm:test_resnet", checkpoint=str(tmp_path / "timm.pth"), target=1,
                           num_classes=3, input_size=32, num_cuts=2)
    first, last = optimise_pixels(g)
    assert last < first


def test_classifier_errors(classifier_files, tmp_path):
    ckpt = str(classifier_files / "squeezenet.safetensors")
    with pytest.raises(ValueError, match="unknown classifier arch"):
        ClassifierGuidance(arch="keras:resnet", checkpoint=None, target=0)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet_18'"):
        ClassifierGuidance(arch="torchvision:resnet_18", checkpoint=None, target=0)
    with pytest.raises(ValueError, match=r"squeezenet\.safetensors.*wrong shapes"):
        ClassifierGuidance(arch="torchvision:squeezenet1_1", checkpoint=ckpt, target=0, num_classes=7)
    with pytest.raises(ValueError, match=r"squeezenet\.safetensors.*missing keys"):
        ClassifierGuidance(arch="timm:test_resnet", checkpoint=ckpt, target=0, num_classes=5)
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        ClassifierGuidance(arch="torchvision:squeezenet1_1", checkpoint=str(tmp_path / "gone.pth"), target=0)
    with pytest.raises(ValueError, match="no labels file"):
        ClassifierGuidance(arch="torchvision:squeezenet1_1", checkpoint=None, target="robin")


def test_classifier_per_prompt_targets_match_single_targets(classifier_files):
    kw = dict(arch="torchvision:squeezenet1_1", checkpoint=str(classifier_files / "squeezenet.safetensors"),
              num_classes=5, input_size=32, labels=str(classifier_files / "labels.txt"), num_cuts=2)
    per = ClassifierGuidance(target={"a crow": "crow", "a wren": 4, "a robin": "Robin"}, **kw)
    assert per.target == {"a crow": 0, "a wren": 4, "a robin": 3}
    x = images(4)
    prompts = ["a wren", "a crow", "a wren", "a robin"]
    loss = per(x, prompts, gens(0, 1, 2, 3))
    expected = torch.cat([ClassifierGuidance(target=per.target[p], **kw)(x[i:i + 1], generators=gens(i))
                          for i, p in enumerate(prompts)])
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match="prompt 'a dog' is not in target.*add 'a dog'"):
        per(x[:2], ["a crow", "a dog"], gens(0, 1))
    with pytest.raises(ValueError, match="one prompt per image"):
        per(x[:2])
    with pytest.raises(ValueError, match="unknown class 'bluejay'"):
        ClassifierGuidance(target={"a": "crow", "b": "bluejay"}, **kw)
    with pytest.raises(ValueError, match="out of range"):
        ClassifierGuidance(target={"a": 9}, **kw)


def test_classifier_loss_is_the_models_cross_entropy(classifier_files):
    """Independent of the guidance code: the model's own log-softmax at each item's target class."""
    import torchvision
    from safetensors.torch import load_file
    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=5).eval()
    checkpoint = str(classifier_files / "squeezenet.safetensors")
    model.load_state_dict(load_file(checkpoint))
    g = ClassifierGuidance(arch="torchvision:squeezenet1_1", checkpoint=checkpoint, num_classes=5, input_size=40,
                           target={"p": 1, "q": 3})
    x = images(2, 40)  # already the input size: no resize
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logp = model(((x + 1) / 2 - mean) / std).log_softmax(-1)
    assert torch.allclose(g(x, ["q", "p"]), -logp[[0, 1], [3, 1]], atol=1e-5)


def test_classifier_in_bf16_returns_float32(classifier_files):
    g = ClassifierGuidance(arch="torchvision:squeezenet1_1", num_classes=5, input_size=32, target=2, num_cuts=2,
                           checkpoint=str(classifier_files / "squeezenet.safetensors"))
    x = images(2).requires_grad_(True)
    ref = g(x, generators=gens(0, 1))
    low = g.to(torch.bfloat16)(x, generators=gens(0, 1))
    low.sum().backward()
    assert low.dtype == torch.float32 and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert torch.allclose(low, ref, rtol=0.1)


# ---------------------------------------------------------------- YAML (LightningCLI / jsonargparse)

def test_every_guidance_builds_from_yaml(clip_files, reference_folder, classifier_files, tmp_path):
    from jsonargparse import ArgumentParser

    torch.save({"weight": torch.ones(1, EMBED_DIM), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    clip = f"pretrained: {clip_files['safetensors']}\n      model_config: {clip_files['config']}\n      num_cuts: 2"
    yaml = f"""
guidance:
  - class_path: doodl_lightning.guidance.CLIPTextGuidance
    init_args:
      {clip}
      prompt: a red circle
  - class_path: doodl_lightning.guidance.CLIPImageGuidance
    init_args:
      {clip}
      references: {reference_folder}
  - class_path: doodl_lightning.guidance.AestheticGuidance
    init_args:
      {clip}
      head: {tmp_path / "head.pth"}
      target: 6.5
  - class_path: doodl_lightning.guidance.ClassifierGuidance
    init_args:
      arch: torchvision:squeezenet1_1
      checkpoint: {classifier_files / "squeezenet.safetensors"}
      target: robin
      labels: {classifier_files / "labels.txt"}
      input_size: 32
  - class_path: doodl_lightning.guidance.SymmetryGuidance
    init_args:
      weight: 0.5
      name: mirror
  - class_path: doodl_lightning.guidance.ClassifierGuidance
    init_args:
      arch: torchvision:squeezenet1_1
      checkpoint: {classifier_files / "squeezenet.safetensors"}
      target: {{p: robin, q: 1}}
      labels: {classifier_files / "labels.txt"}
      input_size: 32
      name: per_prompt_classifier
  - class_path: doodl_lightning.guidance.CLIPImageGuidance
    init_args:
      {clip}
      references:
        p: {reference_folder}
        q: [{reference_folder / "d_rgb.jpg"}]
      name: per_prompt_clip_image
"""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--guidance", type=list[Guidance])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    built = instantiate(parser.parse_string(yaml)).guidance
    assert [g.name for g in built] == ["clip_text", "clip_image", "aesthetic", "classifier", "mirror",
                                       "per_prompt_classifier", "per_prompt_clip_image"]
    assert built[3].target == 3 and built[2].target == 6.5 and built[4].weight == 0.5
    assert built[5].target == {"p": 3, "q": 1} and built[6].index == {"p": 0, "q": 1}
    assert len(built[6].references["p"]) == 3 and built[6].references["q"][0].endswith("d_rgb.jpg")
    x = images(2).requires_grad_(True)
    total = sum(g.weight * g(x, ["p", "q"], gens(0, 1)) for g in built)
    total.sum().backward()
    assert total.shape == (2,) and torch.isfinite(x.grad).all()
