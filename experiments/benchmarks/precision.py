#!/usr/bin/env python
"""Half precision measured: how far is each chain gradient from a float64 reference of the same chain?

For every sampler (``ddim``, ``edict``), backprop mode (``autograd``, ``checkpoint``, ``reversible`` for
EDICT) and precision, one DOODL evaluation is run exactly as the LightningModule runs it
(``doodl_lightning.objective.evaluate``: chain from x_T -> VAE decode -> loss -> d loss / d x_T), and the
gradient is compared with the SAME evaluation in float64 (the same weights cast to float64, the same x_T,
cond/uncond embeddings, schedule and loss; latents and sampler algebra in float64 too):

    rel_err_vs_float64 = ||g - g64|| / ||g64||            (whole gradient, computed in float64)

Precisions (``weights`` = the dtype the UNet and VAE are cast to; latents stay float32 as in the project):

    float64            reference (``64-true``)
    float32            ``32-true``
    float16            fp16 weights, no autocast: ``16-true``, and exactly what produced
                       results/sd15_h200.json (``backprop.py --dtype float16``: model.to(float16), no autocast)
    bfloat16           ``bf16-true``
    float16-mixed      fp16 weights under torch.autocast(float16): what DOODL runs under
                       ``trainer.precision=16-mixed`` (the module casts the backbone to precision_dtype(16-mixed)
                       = float16 and Lightning wraps training_step in autocast)
    bfloat16-mixed     the same with bfloat16
    autocast-float16   float32 weights under torch.autocast(float16): plain Lightning 16-mixed on a float32 model
    autocast-bfloat16  the same with bfloat16

Losses: ``SymmetryGuidance`` (horizontal-symmetry MSE of the decoded image, as backprop.py) through
``objective.weighted_guidance``, normalised either by the image's own pixel count (``mean``, weight 1) or by
3*512*512 (``512px``, weight = pixels / 3*512*512): the per-pixel loss gradient of the 512x512 images of the
H200 run, whose size we cannot afford on a CPU. The loss gradient per pixel is ~1e-6 at 512 px: below
float16's smallest normal number (2^-14 = 6.1e-5).

Patches (proposed fixes, applied here by monkeypatching; doodl_lightning/ is not modified):

    none             the project as it is
    decode           objective.decode_latents runs inside ``cotangent_scaled``: the VAE decoder's VJP gets its
                     cotangent (the loss's gradient w.r.t. the image) scaled to O(1) by a power of two, undone
                     at the latent (as sampling/backprop.py's _vjp does for each UNet VJP of checkpoint)
    decode+autograd  and backprop='autograd' runs the chain inside ``cotangent_scaled`` too (one power of two
                     for the whole chain), so its half-precision UNet VJPs do not underflow either

A loss-scale sweep (tiny model) multiplies the loss by 2^k and divides the gradient by 2^k (what a
GradScaler does), showing the error of each mode against the size of the cotangents.

Models: ``Backbone``s of random-weight architectures (doodl_lightning.testing.architectures): ``tiny`` (8x8
latents) and ``sd15`` (the real SD-1.5 UNet and VAE architecture, 8x8 latents = 64x64 images, CFG 7.5 batched).

    python experiments/benchmarks/precision.py                 # default: ~10 min on one CPU thread
    python experiments/benchmarks/precision.py --quick         # tiny model only, < 1 min
    python experiments/benchmarks/precision.py --sd-cases ddim:10 edict:5 ddim:5 edict:10 \\
        --sd-extra-precisions bfloat16 autocast-float16 float16-mixed float32 --budget 3000

Every record is caught on its own (an unsupported op -> status 'error: ...'); ``--budget`` skips records
that would end after that many seconds (status 'skipped: budget').
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from doodl_lightning import objective  # noqa: E402
from doodl_lightning.families import UNetBackbone as Backbone  # noqa: E402
from doodl_lightning.data import Item, initial_noise  # noqa: E402
from doodl_lightning.guidance import SymmetryGuidance  # noqa: E402
from doodl_lightning.sampling import Schedule, relative_error  # noqa: E402
from doodl_lightning.testing import architectures  # noqa: E402
from doodl_lightning.testing.tiny import sd_scheduler  # noqa: E402

from common import fmt, machine_info, quiet_hf, random_embeddings, text_table  # noqa: E402

DEFAULT_OUT = ROOT / "experiments" / "benchmarks" / "results" / "precision_cpu.json"
F16_MIN_NORMAL = 2.0 ** -14

# name -> (weights dtype, autocast dtype or None, Lightning name)
PRECISIONS = {
    "float64": (torch.float64, None, "64-true"),
    "float32": (torch.float32, None, "32-true"),
    "float16": (torch.float16, None, "16-true (= the H200 run)"),
    "bfloat16": (torch.bfloat16, None, "bf16-true"),
    "float16-mixed": (torch.float16, torch.float16, "16-mixed as DOODL runs it (fp16 weights + autocast)"),
    "bfloat16-mixed": (torch.bfloat16, torch.bfloat16, "bf16-mixed as DOODL runs it (bf16 weights + autocast)"),
    "autocast-float16": (torch.float32, torch.float16, "fp32 weights + autocast(fp16)"),
    "autocast-bfloat16": (torch.float32, torch.bfloat16, "fp32 weights + autocast(bf16)"),
}
HALF = [p for p in PRECISIONS if p not in ("float64", "float32")]
LOSS_NORMS = ("mean", "512px")
PATCHES = ("none", "decode", "decode+autograd")

# -- the proposed fixes, as monkeypatches ------------------------------------------------------------------

# the mechanism the study proposed is now the core's own (sampling/backprop.py); since it is in
# objective.decode_latents and sample(backprop='autograd'), the 'none' patch measures the fixed code and the
# patches add a second, exact (power-of-two) scaling on top
from doodl_lightning.sampling.chains import cotangent_scaled  # noqa: E402


_original_sample = objective.sample


def sample_autograd_scaled(eps, x, schedule, **kw):
    """The proposed ``sample`` of sampling/backprop.py: unchanged except that backprop='autograd' runs the
    chain inside cotangent_scaled."""
    if kw.get("backprop", "checkpoint") != "autograd" or not torch.is_grad_enabled():
        return _original_sample(eps, x, schedule, **kw)
    y = kw.pop("y", None)
    if kw.get("sampler", "ddim") == "edict":
        return cotangent_scaled(lambda a, b: _original_sample(eps, a, schedule, y=b, **kw), x, x if y is None else y)
    return cotangent_scaled(lambda a: _original_sample(eps, a, schedule, y=y, **kw), x)


def make_decode(backbone: Backbone, patch: str, recorder: list | None = None):
    """Backbone.decode, or (patch 'decode...') the proposed decode_latents: the same call inside
    cotangent_scaled, so the VAE decoder's VJP does not underflow on the loss's tiny per-pixel gradient.
    ``recorder`` receives the gradient w.r.t. each decoded latent: the cotangent the chain is handed."""
    def decode(lat):
        if recorder is not None and lat.requires_grad:
            lat.register_hook(lambda g: recorder.append(g.detach().clone()))
        if patch == "none":
            return backbone.decode(lat)
        return cotangent_scaled(backbone.decode, lat)
    return decode


@contextlib.contextmanager
def patched(patch: str):
    """Swap objective.sample for the proposed one ('decode+autograd'); yields objective.evaluate."""
    if patch not in PATCHES:
        raise ValueError(f"unknown patch {patch!r}")
    saved = objective.sample
    if patch == "decode+autograd":
        objective.sample = sample_autograd_scaled
    try:
        yield objective.evaluate
    finally:
        objective.sample = saved


def schedule_for(scheduler, steps: int) -> Schedule:
    """The model's own DDIM grid (SD-1.x: 901, 801, ..., 1 at 10 steps), as backprop.py used for the H200 run."""
    return Schedule.from_scheduler(scheduler, steps, grid="model")


# -- models ------------------------------------------------------------------------------------------------

def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a diffusers model in ``dtype`` without a transient float32 copy (built on the meta device)."""
    with torch.device("meta"):
        copy = type(module).from_config(module.config)
    copy = copy.to(dtype).to_empty(device="cpu")
    copy.load_state_dict(module.state_dict())  # copy_ casts
    return copy.eval().requires_grad_(False)


class Bundle:
    """One model (a Backbone: UNet + VAE + scheduler; embeddings; x_T) with its weights in any dtype, one at a time.

    float32 weights are the master copy; float64 is an in-place cast of it (float32 -> float64 -> float32 is
    exact); half-precision weights are a separate copy, kept until another half dtype is asked for."""

    def __init__(self, name: str, backbone: Backbone, cond, uncond, z_T, guidance_scale: float, note: str = ""):
        self.name, self.master = name, backbone
        self.cond, self.uncond, self.z_T, self.guidance_scale = cond, uncond, z_T, guidance_scale
        self.note = note
        self.half: tuple | None = None  # (dtype, Backbone)

    def backbone(self, dtype: torch.dtype) -> Backbone:
        """The backbone with its UNet and VAE in ``dtype``."""
        if dtype in (torch.float32, torch.float64):
            self.half = None
            if self.master.dtype != dtype:
                self.master.to(dtype)
            return self.master
        if self.master.dtype != torch.float32:
            self.master.to(torch.float32)
        if self.half is None or self.half[0] != dtype:
            self.half = None
            m = self.master
            self.half = (dtype, Backbone(_cast_copy(m.unet, dtype), _cast_copy(m.vae, dtype), None, None, m.scheduler))
        return self.half[1]

    def denoiser(self, dtype: torch.dtype):
        """The CFG denoiser of the backbone in ``dtype`` (and that backbone)."""
        bb = self.backbone(dtype)
        return bb.denoiser(self.cond, self.uncond, self.guidance_scale), bb

    def info(self) -> dict:
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return dict(unet_parameters=n(self.master.unet), vae_parameters=n(self.master.vae), latent_shape=list(self.z_T.shape),
                    image_side=self.image_side, guidance_scale=self.guidance_scale, note=self.note)

    @property
    def image_side(self) -> int:
        return self.z_T.shape[-1] * self.master.vae_scale_factor


def _bundle(name: str, unet, vae, seed: int, guidance_scale: float, latent: int, note: str) -> Bundle:
    cond, uncond = random_embeddings(unet.config.cross_attention_dim, seed)  # as backprop.py
    z = initial_noise(Item(0, "", seed), (1, unet.config.in_channels, latent, latent))
    return Bundle(name, Backbone(unet, vae, None, None, sd_scheduler()), cond, uncond, z, guidance_scale, note=note)


def build_tiny(seed: int, guidance_scale: float) -> Bundle:
    unet = architectures.build_unet("tiny", seed=seed)
    vae = architectures.build_vae("tiny", seed=seed + 1)
    return _bundle("tiny", unet, vae, seed, guidance_scale, 8, "architectures' tiny UNet (8,16) + VAE (8,16), random weights")


def build_sd15(seed: int, guidance_scale: float, latent: int, init_scale: float = 1.0) -> Bundle:
    from diffusers import AutoencoderKL

    unet = architectures.build_unet("sd15", seed=seed)
    # the VAE's weights continue the UNet's random stream (not build_vae's own seed): the recorded results' weights
    vae = AutoencoderKL(**architectures.vae_config("sd15")).eval().requires_grad_(False)
    note = "SD-1.5 UNet + VAE architecture, diffusers' default random init"
    if init_scale != 1.0:
        with torch.no_grad():
            for m in (unet, vae):
                for name, p in m.named_parameters():
                    if p.dim() > 1:
                        p.mul_(init_scale)
        note += f", weight matrices scaled by {init_scale}"
    return _bundle("sd15", unet, vae, seed, guidance_scale, latent, note)


@torch.no_grad()
def activation_ranges(b: Bundle, t: int) -> dict:
    """Largest |activation| of any UNet / VAE-decoder submodule output, float32 weights, at x_T and t."""
    den, bb = b.denoiser(torch.float32)
    out = {}
    for label, model, run in (("unet", bb.unet, lambda: den(b.z_T, t)), ("vae_decoder", bb.vae, lambda: bb.decode(b.z_T))):
        best = [0.0, ""]

        def hook(mod, inp, outp, _best=best):
            ts = outp if isinstance(outp, (tuple, list)) else (getattr(outp, "sample", outp),)
            for o in ts:
                if torch.is_tensor(o) and o.is_floating_point() and o.numel():
                    v = float(o.detach().abs().max())
                    if v > _best[0]:
                        _best[0], _best[1] = v, names[mod]

        names = {m: n for n, m in model.named_modules()}
        handles = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        out[label] = dict(max_abs=best[0], where=best[1], fits_float16=best[0] < 65504.0)
    return out


# -- one gradient ------------------------------------------------------------------------------------------

def loss_norm(norm: str, image_side: int) -> float:
    """The factor on the mean symmetry MSE: 1 (``mean``) or the image's pixels / 3*512*512 (``512px``)."""
    return 1.0 if norm == "mean" else 3 * image_side**2 / (3 * 512 * 512)


def symmetry_objective(norm: str, log2_scale: int, image_side: int, batch: int = 1):
    """SymmetryGuidance through objective.weighted_guidance, weighted by the normalisation and the loss scale 2^k."""
    guide = SymmetryGuidance(weight=loss_norm(norm, image_side) * 2.0 ** log2_scale)
    return objective.weighted_guidance([guide], [""] * batch, None)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def gradient(b: Bundle, job: dict) -> tuple[torch.Tensor, dict]:
    """d loss / d x_T of one evaluation: (gradient in float64, measurements)."""
    wdtype, acdtype, _ = PRECISIONS[job["precision"]]
    den, bb = b.denoiser(wdtype)
    schedule = schedule_for(bb.scheduler, job["steps"])
    latent_dtype = torch.float64 if wdtype == torch.float64 else torch.float32
    z = b.z_T.to(latent_dtype).clone().requires_grad_()
    loss_fn = symmetry_objective(job["loss"], job["log2_scale"], b.image_side, len(z))
    cot: list = []
    t0 = time.perf_counter()
    with patched(job["patch"]) as evaluate, _autocast(acdtype):
        ev = evaluate(den, z, schedule, make_decode(bb, job["patch"], cot), loss_fn,
                      sampler=job["sampler"], backprop=job["backprop"], drift_tolerance=job["drift_tolerance"])
    seconds = time.perf_counter() - t0
    g = z.grad.detach().double() / 2.0 ** job["log2_scale"]
    c = torch.cat([x.flatten().double() for x in cot]) / 2.0 ** job["log2_scale"] if cot else None
    loss_value = float(ev.terms["symmetry"].mean()) * loss_norm(job["loss"], b.image_side)  # normalised, unscaled
    m = dict(seconds=seconds, unet_calls=den.calls, loss_value=loss_value,
             grad_norm=float(g.norm()), grad_finite=bool(torch.isfinite(g).all()),
             reversible_drift=ev.info.get("reversible_drift"), reversible_fallback=ev.info.get("reversible_fallback"))
    if c is not None:
        nz = c[c != 0].abs()
        m.update(cotangent_absmax=float(c.abs().max()), cotangent_rms=float(c.pow(2).mean().sqrt()),
                 cotangent_zero_frac=float((c == 0).double().mean()),
                 cotangent_below_f16_normal_frac=float((c.abs() < F16_MIN_NORMAL).double().mean()),
                 cotangent_min_nonzero=float(nz.min()) if nz.numel() else None)
    return g, m


def per_call(b: Bundle, precision: str, ref: dict | None, steps: int = 10) -> dict:
    """One eps call and its VJP at (x_T, first timestep): the error floor of a single UNet call."""
    wdtype, acdtype, _ = PRECISIONS[precision]
    den, bb = b.denoiser(wdtype)
    t = schedule_for(bb.scheduler, steps).timesteps[0]
    latent_dtype = torch.float64 if wdtype == torch.float64 else torch.float32
    x = b.z_T.to(latent_dtype).clone().requires_grad_()
    c = torch.randn(b.z_T.shape, generator=torch.Generator().manual_seed(7)).to(latent_dtype)
    out = dict(model=b.name, precision=precision, t=t)
    with _autocast(acdtype):
        e = den(x, t)
        vjps = {}
        for k in (0, -20):
            (v,) = torch.autograd.grad(e, x, c * 2.0 ** k, retain_graph=True)
            vjps[k] = v.detach().double() / 2.0 ** k
    res = dict(eps=e.detach().double(), vjp0=vjps[0], vjp20=vjps[-20])
    if ref is not None:
        out["eps_rel_err"] = relative_error(res["eps"], ref["eps"])
        out["vjp_rel_err_cotangent_1"] = relative_error(res["vjp0"], ref["vjp0"])
        out["vjp_rel_err_cotangent_2^-20"] = relative_error(res["vjp20"], ref["vjp0"])
    out["_tensors"] = res
    return out


def autocast_backward_check(b: Bundle, precision: str, sampler: str, backprop: str, steps: int) -> dict:
    """Is the gradient the same whether backward runs inside or outside the autocast region of the forward?
    (checkpoint / reversible recompute UNet calls in backward; they must re-enter the forward's autocast
    state, as Lightning calls backward outside autocast.) An O(1) cotangent, so underflow plays no part."""
    from doodl_lightning.sampling import sample

    wdtype, acdtype, _ = PRECISIONS[precision]
    den, bb = b.denoiser(wdtype)
    z = b.z_T.clone().requires_grad_()
    with _autocast(acdtype):
        finals = sample(den, z, schedule_for(bb.scheduler, steps), sampler=sampler, backprop=backprop, drift_tolerance=1.0)
        gen = torch.Generator().manual_seed(11)
        cots = [torch.randn(f.shape, generator=gen) for f in finals]
        (inside,) = torch.autograd.grad(finals, z, cots, retain_graph=True)
    (outside,) = torch.autograd.grad(finals, z, cots)
    return dict(model=b.name, precision=precision, sampler=sampler, backprop=backprop, steps=steps,
                rel_diff_inside_vs_outside=relative_error(outside.double(), inside.double()))


# -- the plan ----------------------------------------------------------------------------------------------

def _job(model, sampler, steps, precision, backprop, loss, patch="none", log2_scale=0, group="main"):
    return dict(model=model, sampler=sampler, steps=steps, precision=precision, backprop=backprop, loss=loss,
                patch=patch, log2_scale=log2_scale, drift_tolerance=1.0, group=group)


def _modes(sampler):
    return ["autograd", "checkpoint"] + (["reversible"] if sampler == "edict" else [])


def make_plan(args) -> list[dict]:
    """Jobs in priority order (the float64 references of a case come first)."""
    jobs = []
    if "tiny" in args.models:  # tiny: every precision and mode, the fixes, the loss-scale sweep
        for loss in args.tiny_losses:
            for steps in args.steps:
                for sampler in args.samplers:
                    jobs.append(_job("tiny", sampler, steps, "float64", "autograd", loss, group="reference"))
                    if not args.quick:
                        jobs.append(_job("tiny", sampler, steps, "float64", "checkpoint", loss, group="reference-check"))
                    for prec in args.precisions:
                        if prec != "float64":
                            for mode in _modes(sampler):
                                jobs.append(_job("tiny", sampler, steps, prec, mode, loss))
                    for prec in ("float16",) if args.quick else ("float16", "autocast-float16"):
                        if prec in args.precisions:
                            for mode, patch in (("checkpoint", "decode"), ("autograd", "decode"),
                                                ("autograd", "decode+autograd")) + ((("reversible", "decode"),) if sampler == "edict" else ()):
                                jobs.append(_job("tiny", sampler, steps, prec, mode, loss, patch, group="fix"))
        for k in args.sweep:  # GradScaler-style loss scale 2^k, float16 weights
            for sampler in args.samplers:
                for mode in ("autograd", "checkpoint"):
                    jobs.append(_job("tiny", sampler, max(args.steps), "float16", mode, "512px", log2_scale=k, group="sweep"))
    if "sd15" not in args.models:
        return jobs
    # sd15: float64 references first, then the H200 configuration (float16 weights), its fixes, then others
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.sd_cases]
    loss = args.sd_loss
    for s, n in cases:
        jobs.append(_job("sd15", s, n, "float64", "autograd", loss, group="reference"))
    for k, (s, n) in enumerate(cases):  # case by case: as-is modes, then the fixes
        for mode in _modes(s):
            jobs.append(_job("sd15", s, n, "float16", mode, loss))
        jobs.append(_job("sd15", s, n, "float16", "checkpoint", loss, "decode", group="fix"))
        jobs.append(_job("sd15", s, n, "float16", "autograd", loss, "decode+autograd", group="fix"))
        if k == 0:
            jobs.append(_job("sd15", s, n, "float16", "autograd", loss, "decode", group="fix"))
    first = cases[0]
    for prec in args.sd_extra_precisions:
        for mode in ("autograd", "checkpoint") if prec != "float32" else ("checkpoint",):
            jobs.append(_job("sd15", first[0], first[1], prec, mode, loss, group="other-precision"))
    return jobs


def _order_by_weights(jobs: list[dict]) -> list[dict]:
    """Within each model, group jobs by weight dtype (float64, float16, bfloat16, float32) to cast weights
    few times, keeping the priority order inside each group."""
    rank = {torch.float64: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
    models = list(dict.fromkeys(j["model"] for j in jobs))
    return sorted(jobs, key=lambda j: (models.index(j["model"]), rank[PRECISIONS[j["precision"]][0]]))


def _predict(job: dict, records: list[dict]) -> float | None:
    """Seconds a job will take, from finished records of the same model and sampler (per step)."""
    best = None
    for r in records:
        if r["status"] != "ok" or r["model"] != job["model"] or r["sampler"] != job["sampler"]:
            continue
        same_kind = r["precision"] == job["precision"] and r["backprop"] == job["backprop"]
        score = 2 if same_kind else (1 if PRECISIONS[r["precision"]][0] == PRECISIONS[job["precision"]][0] else 0)
        per_step = r["seconds"] / r["steps"] * (1.0 if same_kind else 1.5)
        if best is None or score > best[0]:
            best = (score, per_step)
    return None if best is None else best[1] * job["steps"]


# -- the driver --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output (rewritten after every record)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 steps, a few precisions (< 1 min)")
    p.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=("tiny", "sd15"))
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10], help="tiny model's sampler steps")
    p.add_argument("--samplers", nargs="+", default=["ddim", "edict"], choices=("ddim", "edict"))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--tiny-losses", nargs="+", default=["512px"], choices=LOSS_NORMS,
                   help="tiny model's loss normalisations (the sweep covers larger cotangents)")
    p.add_argument("--sweep", type=int, nargs="*", default=[-8, 0, 8, 16, 24],
                   help="log2 loss scales of the tiny float16 sweep (empty: no sweep)")
    p.add_argument("--sd-cases", nargs="+", default=["ddim:10", "edict:5"], metavar="SAMPLER:STEPS",
                   help="SD cases, most important first (the default fits the budget; e.g. ddim:5 ddim:10 edict:5 edict:10)")
    p.add_argument("--sd-loss", default="512px", choices=LOSS_NORMS)
    p.add_argument("--sd-latent", type=int, default=8, help="SD latent side (8 -> 64x64 images)")
    p.add_argument("--sd-init-scale", type=float, default=1.0, help="multiply SD weight matrices (scaled init)")
    p.add_argument("--sd-extra-precisions", nargs="*",
                   default=["bfloat16", "autocast-float16"],
                   help="precisions measured on the first SD case (autograd and checkpoint; float32: checkpoint)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=570.0, help="skip records that would end after this many seconds")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for c in args.sd_cases:
        if c.count(":") != 1 or c.split(":")[0] not in ("ddim", "edict") or not c.split(":")[1].isdigit():
            p.error(f"--sd-cases takes SAMPLER:STEPS (ddim:10, edict:5), got {c!r}")
    if args.quick:
        args.models = ["tiny"]
        args.steps = [2]
        args.tiny_losses = ["512px"]
        args.sweep = []
        args.precisions = ["float64", "float32", "float16", "bfloat16", "autocast-float16"]
    return args


def _record(job: dict, b: Bundle | None) -> dict:
    wd, ac, lightning = PRECISIONS[job["precision"]]
    r = dict(job)
    r.update(weights_dtype=str(wd).replace("torch.", ""), autocast_dtype=None if ac is None else str(ac).replace("torch.", ""),
             lightning=lightning, status="pending", rel_err_vs_float64=None, rel_err_vs_autograd=None,
             rel_err_vs_checkpoint=None)
    return r


def _case(r: dict) -> tuple:
    return (r["model"], r["sampler"], r["steps"], r["loss"])


def attach_errors(records: list[dict], grads: dict) -> None:
    refs = {_case(r): grads[id(r)] for r in records
            if r["status"] == "ok" and r["precision"] == "float64" and r["backprop"] == "autograd" and r["patch"] == "none"}
    for r in records:
        if r["status"] != "ok":
            continue
        g = grads[id(r)]
        ref = refs.get(_case(r))
        if ref is not None:
            r["rel_err_vs_float64"] = relative_error(g, ref)
        for mode, key in (("autograd", "rel_err_vs_autograd"), ("checkpoint", "rel_err_vs_checkpoint")):
            if r["patch"] != "none":
                continue
            for o in records:
                if (o["status"] == "ok" and o is not r and _case(o) == _case(r) and o["precision"] == r["precision"]
                        and o["backprop"] == mode and o["patch"] == "none" and o["log2_scale"] == r["log2_scale"]):
                    r[key] = relative_error(g, grads[id(o)])


def table(records: list[dict]) -> str:
    cols = [("model", "model", None), ("sampler", "sampler", None), ("steps", "steps", None), ("loss", "loss", None),
            ("precision", "precision", None), ("backprop", "backprop", None), ("patch", "patch", None),
            ("log2 s", "log2_scale", None), ("err vs fp64", "rel_err_vs_float64", "e"),
            ("err vs autograd", "rel_err_vs_autograd", "e"), ("cot |max|", "cotangent_absmax", "e"),
            ("cot <f16 normal %", "cotangent_below_f16_normal_frac", "%"), ("drift", "reversible_drift", "e"),
            ("s", "seconds", "f"), ("status", "status", None)]
    return text_table(cols, records, lambda r, row: row.__setitem__(-1, row[-1][:50]))


def summary(records: list[dict]) -> str:
    """Pivot: rel. error vs float64 of the unpatched modes, one line per case and precision."""
    lines = [f"{'model':5} {'sampler':7} {'steps':>5} {'loss':6} {'precision':18} "
             f"{'autograd':>9} {'checkpoint':>10} {'reversible':>10} | fixes: {'ckpt+dec':>9} {'ag+dec':>9} {'ag+dec+ag':>9}"]
    seen = []
    for r in records:
        key = (*_case(r), r["precision"])
        if r["log2_scale"] == 0 and key not in seen:
            seen.append(key)

    def get(key, mode, patch):
        for r in records:
            if (*_case(r), r["precision"]) == key and r["backprop"] == mode and r["patch"] == patch and r["log2_scale"] == 0:
                return fmt(r["rel_err_vs_float64"], "e") if r["status"] == "ok" else r["status"][:9]
        return ""

    for key in seen:
        lines.append(f"{key[0]:5} {key[1]:7} {key[2]:>5} {key[3]:6} {key[4]:18} {get(key, 'autograd', 'none'):>9} "
                     f"{get(key, 'checkpoint', 'none'):>10} {get(key, 'reversible', 'none'):>10} | "
                     f"{'':7}{get(key, 'checkpoint', 'decode'):>9} {get(key, 'autograd', 'decode'):>9} "
                     f"{get(key, 'autograd', 'decode+autograd'):>9}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_hf()
    start = time.perf_counter()
    out = dict(machine=machine_info("cpu"), args=vars(args), precisions={k: dict(weights=str(w).replace("torch.", ""),
               autocast=None if a is None else str(a).replace("torch.", ""), lightning=l) for k, (w, a, l) in PRECISIONS.items()},
               models={}, per_call=[], autocast_backward_check=[], records=[])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        path.write_text(json.dumps(out, indent=1))

    jobs = _order_by_weights(make_plan(args))
    records, grads = out["records"], {}
    bundles: dict[str, Bundle] = {}
    print(f"# {len(jobs)} gradients; {out['machine']['cpu']} ({out['machine']['cpu_cores']} cores), "
          f"{args.threads} thread(s), torch {torch.__version__}", flush=True)
    for model in dict.fromkeys(j["model"] for j in jobs):
        t0 = time.perf_counter()
        b = build_tiny(args.seed, args.guidance_scale) if model == "tiny" else build_sd15(
            args.seed, args.guidance_scale, args.sd_latent, args.sd_init_scale)
        bundles[model] = b
        info = b.info()
        info["build_seconds"] = time.perf_counter() - t0
        t_first = schedule_for(b.master.scheduler, 10).timesteps[0]
        info["activations_float32"] = activation_ranges(b, t_first)
        out["models"][model] = info
        print(f"# {model}: {info['unet_parameters'] / 1e6:.1f}M UNet params, latents {info['latent_shape']}, "
              f"built in {info['build_seconds']:.1f}s; max |activation| fp32 UNet "
              f"{info['activations_float32']['unet']['max_abs']:.3g} ({info['activations_float32']['unet']['where']}), "
              f"VAE decoder {info['activations_float32']['vae_decoder']['max_abs']:.3g}", flush=True)
        # per-call floor, measured when a precision's weights are first in place (float64 first)
        per_call_todo = ["float64"] + [p for p in dict.fromkeys(j["precision"] for j in jobs if j["model"] == model)
                                       if p != "float64"]
        if model == "sd15":
            per_call_todo = [p for p in per_call_todo if p in ("float64", "float16", "bfloat16")]
        per_call_ref: dict = {}

        def run_per_call(prec, _b=b, _model=model, _ref=per_call_ref):
            try:
                pc = per_call(_b, prec, _ref.get("t"))
                if prec == "float64":
                    _ref["t"] = pc["_tensors"]
                pc.pop("_tensors")
                pc["status"] = "ok"
            except Exception as e:  # unsupported on this CPU: record it
                pc = dict(model=_model, precision=prec, status=f"error: {type(e).__name__}: {str(e)[:200]}")
            out["per_call"].append(pc)

        if model == "tiny":
            for prec in [q for q in ("autocast-float16", "float16-mixed") if q in args.precisions]:
                for sampler in args.samplers:
                    for mode in _modes(sampler):
                        try:
                            chk = autocast_backward_check(b, prec, sampler, mode, max(args.steps))
                            chk["status"] = "ok"
                        except Exception as e:
                            chk = dict(model=model, precision=prec, sampler=sampler, backprop=mode,
                                       status=f"error: {type(e).__name__}: {str(e)[:200]}")
                        out["autocast_backward_check"].append(chk)
        save()

        for job in [j for j in jobs if j["model"] == model]:
            rec = _record(job, b)
            elapsed = time.perf_counter() - start
            pred = _predict(job, records)
            skip = elapsed > args.budget or (pred is not None and elapsed + pred > args.budget)
            wd = PRECISIONS[job["precision"]][0]
            for prec in [q for q in per_call_todo if PRECISIONS[q][0] == wd and (q == "float64" or "t" in per_call_ref)]:
                if not skip:  # measured with the first job that runs on these weights
                    per_call_todo.remove(prec)
                    run_per_call(prec)
            if skip:
                rec["status"] = f"skipped: budget ({elapsed:.0f}s elapsed, ~{pred or 0:.0f}s needed)"
            else:
                try:
                    g, m = gradient(b, job)
                    rec.update(m, status="ok")
                    grads[id(rec)] = g
                except Exception as e:
                    rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    traceback.print_exc()
            records.append(rec)
            attach_errors(records, grads)
            print(f"[{time.perf_counter() - start:6.1f}s] {model} {job['sampler']}-{job['steps']} {job['loss']} "
                  f"{job['precision']} {job['backprop']} patch={job['patch']} 2^{job['log2_scale']}: {rec['status']} "
                  f"err vs fp64 {fmt(rec['rel_err_vs_float64'], 'e')}", flush=True)
            save()
        del bundles[model], b
    out["seconds"] = time.perf_counter() - start
    save()
    print(table(records))
    print()
    print(summary(records))
    sweep = [r for r in records if r["group"] == "sweep"]
    if sweep:
        print("\nloss-scale sweep (loss x 2^k, gradient / 2^k), rel. error vs float64:")
        for r in sweep:
            print(f"  {r['model']} {r['sampler'] + '-' + str(r['steps']):8} {r['precision']} {r['backprop']:10} k={r['log2_scale']:>3}: "
                  f"{fmt(r['rel_err_vs_float64'], 'e')}  (finite: {r.get('grad_finite')}) {r['status'][:40]}")
    print("\nper UNet call at (x_T, t_0):")
    for pc in out["per_call"]:
        print(f"  {pc['model']:5} {pc['precision']:18} eps {fmt(pc.get('eps_rel_err'), 'e')}  VJP(cot~1) "
              f"{fmt(pc.get('vjp_rel_err_cotangent_1'), 'e')}  VJP(cot~2^-20) {fmt(pc.get('vjp_rel_err_cotangent_2^-20'), 'e')}  {pc['status'][:60]}")
    print("\nbackward inside vs outside the forward's autocast region (O(1) cotangent), rel. difference:")
    for c in out["autocast_backward_check"]:
        print(f"  {c['model']} {c['precision']:16} {c['sampler']:5} {c['backprop']:10} "
              f"{fmt(c.get('rel_diff_inside_vs_outside'), 'e')} {c['status'][:60]}")
    print(f"\n# {out['seconds']:.0f}s; wrote {path}")
    return out


if __name__ == "__main__":
    main()
