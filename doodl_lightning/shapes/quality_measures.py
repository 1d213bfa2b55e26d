"""The quality report's measurements (``shapes.quality``): the models, built once from ``ShapesWeights``
(``Models``), and one function per bar -- VAE round trips, the evaluator, the classifier, shapes-CLIP zero-shot,
the aesthetic head, and the evaluator's match of unguided generations (``Backbone.denoiser`` and
``sampling.sample_ddim`` on the model's own DDIM grid). All renders use seeds never used in training."""
from __future__ import annotations

import math

import torch

from ..data import Item, initial_noise
from ..sampling import Schedule, sample_ddim
from . import ShapesWeights
from . import data as D
from .augment import augment

__all__ = ["EVAL_SEED", "Models", "generate", "match_rates", "measure_aesthetic", "measure_classifier", "measure_clip",
           "measure_evaluator", "measure_generation", "measure_vae"]

EVAL_SEED = 7_777_000_000  # fresh renders: far from every training seed range


class Models:
    """Every model the report needs, built once from ``ShapesWeights`` (None where the directory lacks it)."""

    def __init__(self, weights: ShapesWeights, device: torch.device):
        from ..guidance import AestheticGuidance, CLIPTextGuidance

        self.weights, self.device = weights, device
        self.backbone = weights.backbone().to(device) if weights.has("sd-shapes") else None
        self.evaluator = weights.evaluator(device) if weights.has("evaluator") else None
        self._classifiers: dict[int, object] = {}
        has_clip = weights.clip_config.exists() and weights.clip_checkpoint.exists()
        # the measuring CLIP: no fixed prompt (encode_text / embed_images only); the text guides are built per target
        self.clip = CLIPTextGuidance(num_cuts=0, **weights.clip_kwargs()).to(device) if has_clip else None
        self.aesthetic = (AestheticGuidance(head=str(weights.aesthetic_head), num_cuts=0, **weights.clip_kwargs()).to(device)
                          if has_clip and weights.aesthetic_head.exists() else None)

    @property
    def has_classifier(self) -> bool:
        return (self.weights.classifier / "config.json").exists()

    def classifier(self, target: int = 0):
        """The guidance classifier (``ClassifierGuidance``) aiming at ``target``; its logits do not depend on it."""
        from ..guidance import ClassifierGuidance

        if target not in self._classifiers:
            self._classifiers[target] = ClassifierGuidance(target=target, num_cuts=0,
                                                           **self.weights.classifier_kwargs()).to(self.device)
        return self._classifiers[target]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Fine-shape logits (N, classes) of whole images in [-1, 1]."""
        with torch.no_grad():
            return self.classifier().logits(images.to(self.device))[:, 0]

    def clip_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit shapes-CLIP embeddings (N, D) of whole images in [-1, 1]."""
        with torch.no_grad():
            return torch.cat([self.clip.embed_images(c.to(self.device)) for c in images.split(256)])

    def clip_text(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([self.clip.encode_text(texts[j:j + 1024]) for j in range(0, len(texts), 1024)])


# ---------------------------------------------------------------------------------------------------- bars
@torch.no_grad()
def measure_vae(backbone, n, device, evaluator=None) -> dict:
    """PSNR of reconstructions; with ``evaluator``, also how often it still reads each single shape's fine and
    coarse class after the round trip -- a ceiling on generations' shape match that PSNR does not show."""
    attrs = D.sample_attributes(EVAL_SEED + 1, n, p_two=0.2)
    x = D.render(attrs, device)
    rec = torch.cat([backbone.decode(backbone.encode_images(c)) for c in x.split(256)]).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] units
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-10))
    res = {"psnr_db_mean": round(float(psnr.mean()), 2), "psnr_db_of_mean_mse": round(float(10 * math.log10(1 / float(mse.mean()))), 2),
           "n": n, "bar": ">= 32 dB"}
    if evaluator is not None:
        one = (attrs.n_objects == 1).cpu()
        truth, pred = attrs.shape[:, 0][one], evaluator(rec)["shape"].cpu()[one]
        coarse = torch.tensor(D.FINE_TO_COARSE)
        res["evaluator_reads_reconstruction_pct"] = {
            "shape": round(100 * float((pred == truth).float().mean()), 2),
            "coarse_shape": round(100 * float((coarse[pred] == coarse[truth]).float().mean()), 2),
            "per_shape": {s: round(100 * float((pred[truth == i] == i).float().mean()), 1)
                          for i, s in enumerate(D.SHAPES) if bool((truth == i).any())},  # no NaN for absent classes
            "n_single_shape": int(one.sum())}
    return res


@torch.no_grad()
def measure_evaluator(evaluator, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 2, n)
    x = D.render(attrs, device)
    pred = evaluator(x)
    labels = attrs.labels()
    acc = {a: round(float((pred[a] == labels[a]).float().mean()) * 100, 2) for a in D.ATTRIBUTES}
    return {"accuracy_pct": acc, "quality_mae": round(float((pred["quality"] - attrs.quality).abs().mean()), 3), "n": n,
            "bar": ">= 99% per attribute"}


@torch.no_grad()
def measure_classifier(models: Models, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 3, n)
    x = D.render(attrs, device)
    y = attrs.shape[:, 0]
    g = torch.Generator().manual_seed(0)
    res = {}
    for name, xx in [("clean", x), ("noise_0.2", x + 0.2 * torch.randn(x.shape, generator=g).to(device)),
                     ("noise_0.4", x + 0.4 * torch.randn(x.shape, generator=g).to(device)),
                     ("shift_2px", augment(x, 0.0, 2, g))]:
        pred = torch.cat([models.classify(c).argmax(-1).cpu() for c in xx.split(512)])
        res[name] = round(float((pred == y).float().mean()) * 100, 2)
    return {"accuracy_pct": res, "n": n, "bar": ">= 98% clean, robust"}


def _template(size, colour, shape, position, background):
    return f"a {size} {colour} {shape} {D.POSITION_PHRASE[D.POSITIONS.index(position)]} on a {background} background"


@torch.no_grad()
def measure_clip(models: Models, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 4, n)
    img = models.clip_features(D.render(attrs, device))
    lab = attrs.labels()
    acc = {}
    for a in D.ATTRIBUTES:
        names = D.ATTRIBUTE_NAMES[a]
        caps = []
        for i in range(n):
            true = {k: D.ATTRIBUTE_NAMES[k][int(lab[k][i])] for k in D.ATTRIBUTES}
            for v in names:
                t = dict(true, **{a: v})
                caps.append(_template(t["size"], t["colour"], t["shape"], t["position"], t["background"]))
        txt = models.clip_text(caps).view(n, len(names), -1).to(img.device)
        pick = torch.einsum("nd,ncd->nc", img, txt).argmax(-1).cpu()
        acc[a] = round(float((pick == lab[a]).float().mean()) * 100, 2)
    models.clip._text_cache.clear()  # thousands of captions: do not keep them
    return {"zero_shot_accuracy_pct": acc, "n": n, "protocol": "full caption with the true attributes vs the same "
            "caption with this one attribute changed (all alternatives)", "bar": ">= 90%"}


@torch.no_grad()
def measure_aesthetic(models: Models, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 5, n, p_degraded=0.7)
    x = D.render(attrs, device)
    s = torch.cat([models.aesthetic.score(c) for c in x.split(256)]).cpu()
    q = attrs.quality
    r = torch.corrcoef(torch.stack([s, q]))[0, 1]
    rs = torch.corrcoef(torch.stack([s.argsort().argsort().float(), q.argsort().argsort().float()]))[0, 1]
    return {"pearson_r": round(float(r), 3), "spearman_r": round(float(rs), 3), "mae": round(float((s - q).abs().mean()), 3), "n": n}


def _prompts(n, seed, kind):
    attrs = D.sample_attributes(seed, n, p_degraded=0.0)
    lab = attrs.labels()
    prompts, want = [], []
    for i in range(n):
        t = {k: D.ATTRIBUTE_NAMES[k][int(lab[k][i])] for k in D.ATTRIBUTES}
        coarse = D.COARSE_SHAPES[D.FINE_TO_COARSE[int(lab["shape"][i])]]
        if kind == "full":
            prompts.append(_template(t["size"], t["colour"], coarse, t["position"], t["background"]))
            want.append({"coarse_shape": coarse, "colour": t["colour"], "size": t["size"], "position": t["position"],
                         "background": t["background"]})
        else:
            prompts.append(D.with_article(f"{t['colour']} {coarse}"))
            want.append({"coarse_shape": coarse, "colour": t["colour"]})
    return prompts, want


@torch.no_grad()
def generate(backbone, prompts, seeds, steps, cfg, device, batch=128) -> torch.Tensor:
    """Unguided images in [-1, 1]: DDIM (eta 0) on the model's grid from each seed's initial noise, batched CFG."""
    schedule = Schedule.from_scheduler(backbone.scheduler, steps, "model")
    shape = backbone.latent_shape(None)
    uncond = backbone.encode_prompts([""])
    out = []
    for j in range(0, len(prompts), batch):
        ps, ss = prompts[j:j + batch], seeds[j:j + batch]
        z = torch.stack([initial_noise(Item(j + i, p, int(s)), shape) for i, (p, s) in enumerate(zip(ps, ss))]).to(device)
        eps = backbone.denoiser(backbone.encode_prompts(ps), uncond, cfg)
        out.append(backbone.decode(sample_ddim(eps, z, schedule)).clamp(-1, 1))
    return torch.cat(out)


def match_rates(pred_names, want) -> dict:
    keys = sorted({k for w in want for k in w})
    res = {}
    for k in keys:
        pairs = [(p, w) for p, w in zip(pred_names, want) if k in w]
        if k == "coarse_shape":
            hit = [D.COARSE_SHAPES[D.FINE_TO_COARSE[D.SHAPES.index(p["shape"])]] == w[k] for p, w in pairs]
        else:
            hit = [p[k] == w[k] for p, w in pairs]
        res[k] = round(100 * sum(hit) / max(1, len(hit)), 2)
    return res


def _grid_text(schedule: Schedule) -> str:
    ts = schedule.timesteps
    return ", ".join(map(str, ts)) if len(ts) <= 3 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"


def measure_generation(backbone, evaluator, n, device, steps, cfg, seed_offset=6) -> dict:
    """Evaluator match of unguided generations: ``n`` full and ``n`` short prompts (seeds ``EVAL_SEED + seed_offset``
    and the next; another offset gives a held-out prompt set, e.g. for choosing the guidance scale)."""
    from .evaluator import Evaluator

    res = {"num_inference_steps": steps, "guidance_scale": cfg, "sampler": "DDIM (eta 0, sampling.sample_ddim)",
           "timestep_grid": "model", "timesteps": _grid_text(Schedule.from_scheduler(backbone.scheduler, steps, "model"))}
    for kind, seed in [("full", EVAL_SEED + seed_offset), ("short", EVAL_SEED + seed_offset + 1)]:
        prompts, want = _prompts(n, seed, kind)
        imgs = generate(backbone, prompts, [seed + i for i in range(n)], steps, cfg, device)
        pred = evaluator(imgs)
        res[f"{kind}_prompts_match_pct"] = match_rates(Evaluator.names(pred), want)
        res[f"{kind}_prompts_evaluator_quality_mean"] = round(float(pred["quality"].mean()), 2)
        res[f"{kind}_example_prompt"] = prompts[0]
    res["n_per_prompt_set"] = n
    res["bar"] = ">= 90% shape (coarse: circle / polygon / star) and colour"
    return res
