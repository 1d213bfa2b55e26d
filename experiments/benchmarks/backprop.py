#!/usr/bin/env python
"""Cost and accuracy of the three chain-gradient modes (autograd / checkpoint / reversible).

One *iteration* is exactly what the LightningModule runs per optimisation step:
``doodl_lightning.objective.evaluate`` = sample the chain from the initial latents, VAE-decode the
final latent(s) (the EDICT pair one at a time), a loss on the image (here ``SymmetryGuidance``, the
horizontal-symmetry MSE, so no guidance model is needed), and the backward pass into the latents. The model
is a ``doodl_lightning.backbone.Backbone``: random-weight architectures (``--sd-config``) or ``--pretrained``.

    python experiments/benchmarks/backprop.py --steps 5 10 20 --json out.json       # tiny model, CPU
    python experiments/benchmarks/backprop.py --sd-config sd15 --device cuda --dtype float16 \\
        --steps 10 50 100 --samplers edict ddim --backprops checkpoint reversible --json sd15.json
    python experiments/benchmarks/backprop.py --pretrained runwayml/stable-diffusion-v1-5 ...
    python experiments/benchmarks/backprop.py --sd-config flux-schnell --resolution 64 --steps 1 --json out.json
        # SD3.5-medium / FLUX.1 (sd35-medium, flux-dev, flux-schnell): samplers flow, flow_edict; on a machine
        # without the memory for the full transformer, fewer blocks (--layers N; chosen and noted automatically)
    python experiments/benchmarks/backprop.py --sd-config sana-sprint --samplers scm --steps 1 2 ...
        # the newer families through their own backbones (doodl_lightning.testing.family_models): sana-sprint (scm),
        # sana-1600m (flow_dpm, CFG), flux2-klein (flow), qwen-image (flow, CFG; --build-in-dtype
        # --transformer-checkpointing on an 80 GB GPU); --tiny: each model's tiny counterpart (CPU checks)

Per record (one sampler x backprop x steps x batch x dtype x options) it reports:
seconds_per_iteration (median of the timed repeats after the warm-up), saved_bytes (bytes the chain's
forward pass saves for backward, counted with saved_tensors_hooks), peak_memory_bytes (CUDA max allocated
on GPU; peak RSS of a fresh subprocess per record on CPU), unet_calls per iteration,
grad_rel_error_vs_autograd (same dtype, where autograd was run), grad_rel_error_vs_fp32 (against the same
gradient computed with the model in float32, ``--grad-reference float32``), reversible_drift/fallback.

On CUDA every record runs in this process (the model is built once) and a failing record (out of
memory, anything else) is reported with its status without stopping the others; ``--deadline`` and
``--record-budget`` bound the wall time. ``--plan`` gives an explicit list of record groups (used by
``gpu_sd15.sh``). Speed options, all off by default: ``--vae-checkpointing`` (VAE-decoder gradient
checkpointing), ``--channels-last``, ``--compile`` (torch.compile of the UNet), ``--cuda-graphs``
(UNet forward / forward-with-graph / input-VJP replayed as CUDA graphs; see doodl_lightning.cuda_graphs).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from doodl_lightning.families import FlowBackbone, UNetBackbone, backbone_class  # noqa: E402
from doodl_lightning.cuda_graphs import GraphedUNet  # noqa: E402
from doodl_lightning.data import Item, initial_noise, step_generator  # noqa: E402
from doodl_lightning.guidance import SymmetryGuidance  # noqa: E402
from doodl_lightning.objective import evaluate, weighted_guidance  # noqa: E402
from doodl_lightning.sampling import BACKPROPS, SAMPLERS, Denoiser, relative_error  # noqa: E402
from doodl_lightning.testing import architectures, family_models, flow_models  # noqa: E402

from common import (DTYPES, fmt, free, machine_description, peak_rss, quiet_hf, random_conditioning, sync,  # noqa: E402
                    text_table)

ACCELS = ("eager", "graphs", "compile")
# the transformer models (random weights): SD3.5 / FLUX.1 as FlowBackbone, the newer families through their own class
FAMILIES = family_models.FAMILY_ARCHITECTURES
TRANSFORMERS = flow_models.FLOW_ARCHITECTURES + FAMILIES
DEFAULT_RESOLUTION = {**architectures.DEFAULT_RESOLUTION, **flow_models.FLOW_DEFAULT_RESOLUTION,
                      **family_models.FAMILY_DEFAULT_RESOLUTION}
TINY = {"sd35-medium": "tiny-sd3", "flux-dev": "tiny-flux-dev", "flux-schnell": "tiny-flux-schnell", **family_models.TINY}
JOB_KEYS = ("sampler", "backprop", "steps", "batch", "dtype", "accel", "channels_last", "vae_checkpointing",
            "drift_tolerance", "repeats", "warmup", "budget", "role")
RECORD_KEYS = (
    "sampler", "backprop", "steps", "batch", "resolution", "dtype", "device", "model", "accel", "channels_last",
    "vae_checkpointing", "guidance_scale", "role", "status", "seconds_per_iteration", "seconds_min", "seconds_all", "repeats",
    "warmup_seconds", "setup_seconds", "saved_bytes", "peak_memory_bytes", "peak_memory_kind",
    "peak_reserved_bytes", "unet_calls", "loss", "grad_rel_error_vs_autograd", "grad_rel_error_vs_fp32",
    "time_vs_autograd", "reversible_drift", "reversible_fallback", "drift_tolerance", "note", "interleaved",
    "floor_seconds", "floor_parts", "time_vs_floor",
)


# -- the model under test --------------------------------------------------------------------------------

class Model:
    """A frozen ``Backbone`` (UNet + VAE + scheduler) and its conditioning on one device; dtype and speed
    options switch per job.

    Weights are created (or loaded) in float32 once; switching dtype reloads them from a float32 master
    copy kept on the CPU, so every dtype and the float32 reference see the same weights.
    """

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.args = args
        quiet_hf()  # diffusers warns on every dtype cast of a model built from a config
        t0 = time.perf_counter()
        self.note = None
        # --build-in-dtype: the random weights are created in --dtype (no float32 build, no float32 master copy)
        build_dtype = DTYPES[args.dtype] if getattr(args, "build_in_dtype", False) else torch.float32
        if args.pretrained:
            self.name = args.pretrained
            flow = issubclass(backbone_class(args.pretrained), FlowBackbone)
            self.backbone = backbone_class(args.pretrained)(args.pretrained).to(self.device)
            size = (args.resolution, args.resolution) if args.resolution else None
            cond = self.backbone.encode_prompts([args.prompt], size).float()
            uncond = self.backbone.encode_negative("", size).float()
            # only the two embeddings stay: the text encoders' weights must not count in any record's peak
            if flow:
                self.backbone.release_text_encoders()
            else:
                self.backbone.text_encoder_2 = None
                self.backbone.text_encoder = None
        elif args.sd_config in flow_models.FLOW_ARCHITECTURES:
            # SD3.5 / FLUX.1 with random weights and unit-normal text embeddings of the pipeline's lengths
            layers = args.layers  # resolved by main (flow_layers)
            self.name = f"{args.sd_config} (random weights{'' if layers is None else f', --layers {layers}'})"
            if layers is not None:
                self.note = _shortened(args.sd_config, layers)
            transformer = flow_models.build_flow_transformer(args.sd_config, device=self.device, seed=args.seed,
                                                             layers=layers)
            self.backbone = FlowBackbone(transformer, flow_models.build_flow_vae(args.sd_config, device=self.device),
                                         flow_models.build_flow_scheduler(args.sd_config))
            res = args.resolution or flow_models.FLOW_DEFAULT_RESOLUTION[args.sd_config]
            tokens = (77 if self.backbone.family == "sd3" else 0) + self.backbone.max_sequence_length
            cond, uncond = random_conditioning(transformer, args.seed, (res, res), text_tokens=tokens)
        elif args.sd_config in FAMILIES:
            # SANA / SANA-Sprint / FLUX.2 klein / Qwen-Image through their own backbone classes, random weights and
            # unit-normal text states of their encoders' shapes (family_models.random_conditioning)
            layers = args.layers  # resolved by main (flow_layers)
            self.name = f"{args.sd_config} (random weights{'' if layers is None else f', --layers {layers}'})"
            if layers is not None:
                self.note = _shortened(args.sd_config, layers)
            self.backbone = family_models.build_family_backbone(args.sd_config, device=self.device, seed=args.seed,
                                                                layers=layers, dtype=build_dtype)
            cond, uncond = family_models.random_conditioning(args.sd_config, self.backbone, args.seed)
        else:
            # random weights: a random text encoder would only turn random ids into random embeddings, so draw
            # the (unit-scale) embeddings directly: no transformers import, no 0.5 GB on the GPU
            self.name = f"{args.sd_config} (random weights)"
            parts = architectures.build_components(args.sd_config, device=self.device, dtype=torch.float32, seed=args.seed,
                                                   parts=("unet", "vae", "scheduler"))
            controlnet = None
            if args.controlnet:  # the base's ControlNet (diffusers' from_unet), random image per record
                controlnet = architectures.build_controlnet(parts["unet"], vae_scale_factor=architectures.vae_scale_factor(args.sd_config))
                self.name += " + ControlNet"
            self.backbone = UNetBackbone(parts["unet"], parts["vae"], None, None, parts["scheduler"], controlnet=controlnet)
            res = args.resolution or architectures.DEFAULT_RESOLUTION[args.sd_config]
            cond, uncond = random_conditioning(self.backbone.unet, args.seed, (res, res))
        self.cond, self.uncond = cond.to(self.device), uncond.to(self.device)
        self.unet, self.vae, self.scheduler = self.backbone.unet, self.backbone.vae, self.backbone.scheduler
        if getattr(args, "transformer_checkpointing", False):
            # the network's own gradient checkpointing inside each step's with-grad recomputation (the backbones'
            # transformer_checkpointing option): only block inputs stay for the VJP
            self.unet.enable_gradient_checkpointing()
            self.note = "; ".join(n for n in (self.note, "transformer gradient checkpointing") if n)
        self.dtype = next(self.unet.parameters()).dtype  # float32, or --dtype with --build-in-dtype
        self.channels_last, self.master = False, None
        self.graphed: GraphedUNet | None = None
        self.graphs_error: str | None = None  # set once capture failed: later graphs jobs run eager
        self.compiled = None
        self.build_seconds = time.perf_counter() - t0
        free(self.device)

    def configure(self, dtype: torch.dtype, channels_last: bool, vae_checkpointing: bool) -> None:
        if dtype != self.dtype:
            if self.master is None:  # first switch away from the float32 build: keep its weights
                self.master = {k: {n: p.detach().cpu().clone() for n, p in m.state_dict().items()}
                               for k, m in self._weights()}
            for k, m in self._weights():
                m.to(dtype=torch.float32)
                m.load_state_dict(self.master[k])
                m.to(dtype=dtype)
            self.dtype, self.graphed, self.compiled = dtype, None, None
            free(self.device)
        if channels_last != self.channels_last:
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            self.unet.to(memory_format=memory_format)
            self.vae.to(memory_format=memory_format)
            self.channels_last, self.graphed, self.compiled = channels_last, None, None
        if vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        else:
            self.vae.disable_gradient_checkpointing()

    def _weights(self):
        parts = [("unet", self.unet), ("vae", self.vae)]
        return parts + ([("controlnet", self.backbone.controlnet)] if self.backbone.controlnet is not None else [])

    def denoiser(self, accel: str, guidance_scale: float) -> Denoiser:
        """The backbone's CFG denoiser, its UNet swapped for the compiled or graphed one."""
        control = None
        if self.backbone.controlnet is not None:
            res = self.args.resolution or DEFAULT_RESOLUTION[self.args.sd_config]
            control = torch.rand((1, 3, res, res), generator=torch.Generator().manual_seed(self.args.seed)).to(self.device)
        den = self.backbone.denoiser(self.cond, self.uncond, guidance_scale, control_image=control)
        if accel == "compile":
            if self.compiled is None:
                self.compiled = torch.compile(self.unet, mode=self.args.compile_mode, dynamic=False)
            if isinstance(self.backbone, FlowBackbone):
                den.transformer = self.compiled
            else:
                den.unet = self.compiled
        if accel == "graphs":
            if isinstance(self.backbone, FlowBackbone):
                raise RuntimeError("CUDA graphs capture the UNet only (SD-1.x/2.x); use --compile for SD3 / FLUX")
            if self.device.type != "cuda":
                raise RuntimeError("CUDA graphs need --device cuda")
            if self.graphed is None:
                self.graphed = GraphedUNet(self.unet)
            den.unet = self.graphed
        elif self.graphed is not None:  # free the graphs' memory pools before measuring anything else
            self.graphed = None
            free(self.device)
        return den

    def items(self, batch: int) -> list[Item]:
        """Item i has seed ``--seed`` + i: the same item (latents, generators) whatever the batch."""
        return [Item(i, self.args.prompt, self.args.seed + i) for i in range(batch)]

    def latents(self, batch: int, resolution: int) -> torch.Tensor:
        shape = self.backbone.latent_shape(resolution)
        return torch.stack([initial_noise(item, shape) for item in self.items(batch)]).to(self.device)

    def loss_fn(self, batch: int):
        """The objective of every record: horizontal symmetry of the decoded image (no guidance model)."""
        items = self.items(batch)
        return weighted_guidance([SymmetryGuidance()], [it.prompt for it in items],
                                 [step_generator(it, 0, stream=1) for it in items])


def _parameter_count(name: str, layers: int | None = None) -> int:
    count = family_models.family_parameter_count if name in FAMILIES else flow_models.flow_parameter_count
    return count(name, layers)


def _shortened(name: str, layers: int) -> str:
    """The record's note for a transformer built with ``--layers``: blocks and parameters kept of the full model's."""
    config = family_models.family_transformer_config if name in FAMILIES else flow_models.flow_transformer_config
    (_, full), (_, cut) = config(name), config(name, layers)
    blocks = ("num_layers", "num_single_layers")
    return (f"transformer shortened to {' + '.join(f'{cut[k]} of {full[k]}' for k in blocks if k in cut)} "
            f"blocks ({_parameter_count(name, layers) / 1e9:.2f} of {_parameter_count(name) / 1e9:.2f} B parameters)")


def flow_layers(args) -> int | None:
    """``--layers``, or on CPU the full model when its float32 weights (x 1.5 for the VJP's working memory) fit in
    the available memory, else 1 (printed: the record's model and note say what ran)."""
    if args.layers is not None or torch.device(args.device).type != "cpu":
        return args.layers
    need = _parameter_count(args.sd_config) * 4 * 1.5
    available = _available_memory()
    if available is None or need <= available:
        return None
    print(f"# {args.sd_config}: the full transformer needs ~{need / 2**30:.0f} GiB here (float32 weights x 1.5), "
          f"{available / 2**30:.0f} GiB available: building it with --layers 1 (pass --layers N to choose)", flush=True)
    return 1


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _SavedBytes:
    """saved_tensors_hooks counter, active until the chain returns (the first decode call).

    Counts each saved storage once (a tensor saved twice, or views of one storage, hold its memory once)
    and skips the frozen weights, which autograd saves by reference for every layer's input-VJP."""

    def __init__(self, *modules):
        self.bytes, self.active, self.seen = 0, True, set()
        self.skip = {t.untyped_storage().data_ptr() for m in modules for t in itertools.chain(m.parameters(), m.buffers())}

    def pack(self, t):
        if self.active:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.skip and ptr not in self.seen:
                self.seen.add(ptr)
                self.bytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t


# -- one record -------------------------------------------------------------------------------------------

def _prepare(model: Model, job: dict, args):
    """Set the model up for ``job``; returns (record so far, iteration closure)."""
    device = model.device
    rec = _base_record(job, args, model)
    t_setup = time.perf_counter()
    dtype = DTYPES[job["dtype"]]
    model.configure(dtype, job["channels_last"], job["vae_checkpointing"])
    if args.sd_config in FAMILIES and not args.pretrained:
        model.backbone.check_sampler(job["sampler"])  # one line for a sampler the family cannot run
    # the model's own grid: any step count (the official grid needs steps dividing 1000); timings do not
    # depend on which timesteps are visited
    schedule = model.backbone.schedule(job["steps"], "model", (rec["resolution"], rec["resolution"]))
    z0 = model.latents(job["batch"], rec["resolution"])
    den = None
    if job["accel"] == "graphs" and model.graphs_error is None and (model.cond.added or model.backbone.controlnet is not None):
        model.graphs_error = "the CUDA-graph UNet takes text hidden states only (SD-1.x/2.x without ControlNet)"
    if job["accel"] == "graphs" and model.graphs_error is None:
        try:  # capture once per input shape (as the Denoiser batches it), before anything is timed
            den = model.denoiser("graphs", args.guidance_scale)
            b, cfg = z0.shape[0], args.guidance_scale not in (0.0, 1.0)
            emb = lambda e: e.expand(b, *e.shape[1:])  # noqa: E731
            x = torch.cat([z0, z0]) if cfg else z0
            hid_c, hid_u = model.cond.hidden, model.uncond.hidden
            ctx = torch.cat([emb(hid_u), emb(hid_c)]) if cfg else emb(hid_c if args.guidance_scale else hid_u)
            model.graphed.prepare(x.to(dtype), torch.as_tensor(schedule.timesteps[0], device=device), ctx.to(dtype))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # e.g. an op that cannot be captured: say so and measure eager instead
            model.graphs_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc()
            den = None
    if job["accel"] == "graphs" and model.graphs_error is not None:
        rec.update(accel="eager", note=f"CUDA graphs failed ({model.graphs_error}); measured eager")
    if den is None:
        den = model.denoiser(rec["accel"], args.guidance_scale)
    if device.type == "cuda":
        free(device)
        torch.cuda.reset_peak_memory_stats(device)
    rec["setup_seconds"] = time.perf_counter() - t_setup

    loss_fn = model.loss_fn(job["batch"])
    noises = None
    if SAMPLERS[job["sampler"]].renoises:  # LCM's / sCM's between-step noise, fixed per record
        gen = torch.Generator().manual_seed(args.seed + 7)
        noises = [torch.randn(z0.shape, generator=gen).to(device) for _ in range(len(schedule) - 1)]

    def iteration(counter: _SavedBytes | None = None):
        z = z0.clone().requires_grad_()
        decode = model.backbone.decode
        if counter is not None:
            def decode(lat, _counter=counter):
                _counter.active = False  # the chain's forward is over
                return model.backbone.decode(lat)
        calls0 = den.calls
        sync(device)
        t0 = time.perf_counter()
        if counter is not None:
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                ev = evaluate(den, z, schedule, decode, loss_fn, sampler=job["sampler"], backprop=job["backprop"],
                              mix_weight=args.mix_weight, drift_tolerance=job["drift_tolerance"], noises=noises)
        else:
            ev = evaluate(den, z, schedule, decode, loss_fn, sampler=job["sampler"], backprop=job["backprop"],
                          mix_weight=args.mix_weight, drift_tolerance=job["drift_tolerance"], noises=noises)
        sync(device)
        return time.perf_counter() - t0, z.grad, ev, den.calls - calls0

    iteration.den = den
    iteration.floor = lambda: _floor(model, den, z0, schedule, job, noises)
    return rec, iteration


def _median_seconds(fn, device, repeats: int = 3) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _floor(model: Model, den, z0: torch.Tensor, schedule, job: dict, noises) -> dict:
    """The iteration's floor: its model calls timed alone in this run, at the record's shapes — a UNet forward
    (no graph), a UNet forward with its VJP, a VAE decode with its VJP — times how many the chain needs:
    k steps x (forward + forward with VJP) + (decodes with VJP), k = 2 UNet calls per step for EDICT and
    flow_edict (one per latent) and 2 decoded images, 1 otherwise (the flow models' transformer likewise). ``reversible`` adds inverse forwards it does not count."""
    device, t = model.device, schedule.timesteps[0]
    x = z0.clone()

    def forward():
        with torch.no_grad():
            den(x, t)

    def forward_vjp():
        xi = x.clone().requires_grad_()
        e = den(xi, t)
        torch.autograd.grad(e, xi, torch.ones_like(e))

    def decode_vjp():
        zi = x.clone().requires_grad_()
        img = model.backbone.decode(zi)
        torch.autograd.grad(img.float().square().sum(), zi)

    parts = {"unet_forward": _median_seconds(forward, device), "unet_forward_vjp": _median_seconds(forward_vjp, device),
             "decode_vjp": _median_seconds(decode_vjp, device)}
    k = 2 if job["sampler"] in ("edict", "flow_edict") else 1
    floor = k * len(schedule) * (parts["unet_forward"] + parts["unet_forward_vjp"]) + k * parts["decode_vjp"]
    return {"floor_seconds": floor, "floor_parts": parts}


def run_job(model: Model, job: dict, args) -> tuple[dict, torch.Tensor | None]:
    """Measure one record in this process; returns (record, gradient on the CPU in float64)."""
    rec, iteration = _prepare(model, job, args)
    counter = _SavedBytes(model.unet, model.vae)
    warm = []
    for k in range(job["warmup"]):
        dt, grad, ev, calls = iteration(counter if k == 0 else None)
        warm.append(dt)
    times = []
    budget = job["budget"]
    for k in range(max(1, job["repeats"])):
        if k > 0 and budget and sum(times) + times[-1] > budget:
            break
        dt, grad, ev, calls = iteration(counter if (k == 0 and not warm) else None)
        times.append(dt)
    rec, g = _finish(model, job, rec, iteration, counter, warm, times, (grad, ev, calls))
    if args.floor and job["backprop"] != "autograd" and job["role"] == "timed":
        rec.update(iteration.floor())
        rec["time_vs_floor"] = rec["seconds_per_iteration"] / rec["floor_seconds"]
    return rec, g


def _finish(model, job, rec, iteration, counter, warm, times, last):
    device = model.device
    grad, ev, calls = last
    rec.update(
        status="ok", seconds_per_iteration=statistics.median(times), seconds_min=min(times), seconds_all=times, repeats=len(times),
        warmup_seconds=warm[0] if warm else None, saved_bytes=counter.bytes, unet_calls=calls,
        loss=float(ev.total.mean()), reversible_drift=ev.info.get("reversible_drift"),
        reversible_fallback=ev.info.get("reversible_fallback"),
    )
    if device.type == "cuda":
        rec.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), peak_memory_kind="cuda_max_allocated")
    else:
        rec.update(peak_memory_bytes=peak_rss(), peak_memory_kind="rss_process")
    if job["accel"] == "graphs" and model.graphed is not None:
        rec["graph_refreshes"] = sum(g.refreshes for g in model.graphed.graphs.values())
    g = None if grad is None else grad.detach().double().cpu()
    return rec, g


def run_interleaved(model: Model, jobs: list[dict], args) -> list[tuple[dict, torch.Tensor | None]]:
    """The same records as :func:`run_job`, but the iterations of ``jobs`` (which differ only in backprop)
    alternate round-robin, so a slow spell on a shared machine hits every mode alike: use it for time
    RATIOS on a busy CPU. Peak memory is then the process's, not each record's."""
    preps = [_prepare(model, j, args) for j in jobs]
    counters = [_SavedBytes(model.unet, model.vae) for _ in jobs]
    warm, times, last = [[] for _ in jobs], [[] for _ in jobs], [None] * len(jobs)
    for k in range(max(j["warmup"] for j in jobs)):
        for i, (j, (rec, iteration)) in enumerate(zip(jobs, preps)):
            if k < j["warmup"]:
                dt, *last[i] = iteration(counters[i] if k == 0 else None)
                warm[i].append(dt)
    for k in range(max(max(1, j["repeats"]) for j in jobs)):
        for i, (j, (rec, iteration)) in enumerate(zip(jobs, preps)):
            if k < max(1, j["repeats"]):
                dt, *last[i] = iteration(counters[i] if (k == 0 and not warm[i]) else None)
                times[i].append(dt)
    out = []
    for i, (j, (rec, iteration)) in enumerate(zip(jobs, preps)):
        rec, g = _finish(model, j, rec, iteration, counters[i], warm[i], times[i], tuple(last[i]))
        rec["interleaved"] = True
        out.append((rec, g))
    return out


def _base_record(job: dict, args, model: Model | None = None) -> dict:
    rec = {k: None for k in RECORD_KEYS}
    rec.update({k: job[k] for k in ("sampler", "backprop", "steps", "batch", "dtype", "accel", "channels_last",
                                    "vae_checkpointing", "drift_tolerance", "role")})
    res = args.resolution or DEFAULT_RESOLUTION.get(args.sd_config, 512)
    rec.update(resolution=res, device=str(args.device), guidance_scale=args.guidance_scale,
               model=model.name if model is not None else (args.pretrained or f"{args.sd_config} (random weights)"))
    if model is not None and model.note and not rec.get("note"):
        rec["note"] = model.note
    return rec


# -- the driver --------------------------------------------------------------------------------------------

def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def make_jobs(args) -> list[dict]:
    """Expand the plan (``--plan`` groups, or the command line's product) into a list of jobs."""
    defaults = dict(samplers=args.samplers, backprops=args.backprops, steps=args.steps, batch=args.batch,
                    dtype=args.dtype, accel=args.accel, channels_last=args.channels_last,
                    vae_checkpointing=args.vae_checkpointing, repeats=args.repeats, warmup=args.warmup,
                    budget=args.record_budget, max_autograd_steps=args.max_autograd_steps,
                    drift_tolerance=args.drift_tolerance)
    groups = [{}] if args.plan is None else _read_plan(args.plan)
    jobs, seen = [], set()
    for group in groups:
        unknown = set(group) - set(defaults)
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; allowed: {sorted(defaults)}")
        g = dict(defaults, **group)
        for batch, sampler, backprop, steps, dtype in itertools.product(
                _as_list(g["batch"]), _as_list(g["samplers"]), _as_list(g["backprops"]), _as_list(g["steps"]),
                _as_list(g["dtype"])):
            if backprop == "reversible" and sampler not in ("edict", "flow_edict"):
                continue
            if backprop == "autograd" and g["max_autograd_steps"] is not None and steps > g["max_autograd_steps"]:
                continue
            job = dict(sampler=sampler, backprop=backprop, steps=int(steps), batch=int(batch), dtype=dtype,
                       accel=g["accel"], channels_last=bool(g["channels_last"]),
                       vae_checkpointing=bool(g["vae_checkpointing"]), drift_tolerance=float(g["drift_tolerance"]),
                       repeats=int(g["repeats"]),
                       warmup=int(g["warmup"]), budget=g["budget"], role="timed")
            key = tuple(job[k] for k in JOB_KEYS[:9])
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    if args.grad_reference == "float32":  # the same gradient with the model in float32, once per case
        refs = {}
        for j in jobs:
            if j["dtype"] != "float32" and j["steps"] <= args.reference_max_steps:
                key = (j["sampler"], j["steps"], j["batch"])
                refs.setdefault(key, dict(j, backprop="checkpoint", dtype="float32", accel="eager", channels_last=False,
                                          repeats=1, warmup=0, budget=None, role="reference"))
        jobs += list(refs.values())  # last: on one device the model switches to float32 once
    for j in jobs:
        if j["sampler"] not in SAMPLERS or j["backprop"] not in BACKPROPS or j["dtype"] not in DTYPES or j["accel"] not in ACCELS:
            raise ValueError(f"bad job {j}: samplers {SAMPLERS}, backprops {BACKPROPS}, dtypes {tuple(DTYPES)}, accel {ACCELS}")
    return jobs


def _read_plan(plan: str) -> list[dict]:
    text = plan if plan.lstrip().startswith("[") else Path(plan).read_text()
    groups = json.loads(text)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("--plan must be a JSON list of objects")
    return groups


def _predict_seconds(job: dict, records: list[dict]) -> float | None:
    """Wall time of a job from earlier records of the same kind, scaled by steps and (when no record has
    this batch size) linearly by batch, which over-estimates (None: no estimate)."""
    best = None
    for r in records:
        if r["status"] == "ok" and r["role"] == "timed" and all(r[k] == job[k] for k in ("sampler", "backprop", "dtype", "accel")):
            per_step = r["seconds_per_iteration"] / r["steps"] * (1.0 if r["batch"] == job["batch"] else job["batch"] / r["batch"])
            exact = r["batch"] == job["batch"]
            if best is None or (exact, -per_step) > (best[0], -best[1]):
                best = (exact, per_step)
    if best is None:
        return None
    return best[1] * job["steps"] * (job["warmup"] + max(1, job["repeats"]))


def run_subprocess(job: dict, args, grad_path: str) -> tuple[dict, torch.Tensor | None]:
    """One record in a fresh interpreter: its peak RSS is this record's alone."""
    payload = json.dumps({"args": vars(args), "job": job, "grad_path": grad_path})
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", payload]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.subprocess_timeout)
    except subprocess.TimeoutExpired:
        rec = _base_record(job, args)
        rec["status"] = f"error: subprocess timed out after {args.subprocess_timeout}s"
        return rec, None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT "):])
            grad = torch.load(grad_path, weights_only=True) if os.path.exists(grad_path) else None
            return rec, grad
    rec = _base_record(job, args)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    rec["status"] = f"error: worker exit {proc.returncode}: {tail[0][:300]}"
    sys.stderr.write(proc.stderr[-4000:])
    return rec, None


def worker_main(payload: str) -> None:
    data = json.loads(payload)
    args = argparse.Namespace(**data["args"])
    _setup_torch(args)
    model = Model(args)
    before = peak_rss()  # interpreter + libraries + model: the floor under every record's peak
    rec, grad = run_job(model, data["job"], args)
    if model.device.type == "cpu":
        rec.update(peak_memory_bytes=peak_rss(), peak_memory_kind="rss_fresh_subprocess", rss_before_job_bytes=before)
    if grad is not None:
        torch.save(grad, data["grad_path"])
    print("RESULT " + json.dumps(rec), flush=True)


def _setup_torch(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        # the float32 reference must be float32: no TF32 in convolutions or matmuls
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)


def attach_errors(records: list[dict], grads: list) -> None:
    def find(pred):
        for r, g in zip(records, grads):
            if g is not None and r["status"] == "ok" and pred(r):
                return g
        return None

    same = lambda a, b: all(a[k] == b[k] for k in ("sampler", "steps", "batch"))  # noqa: E731
    for r, g in zip(records, grads):
        if g is None or r["role"] != "timed":
            continue
        ref = find(lambda o: o["role"] == "timed" and o["backprop"] == "autograd" and same(o, r)
                   and o["dtype"] == r["dtype"] and o["accel"] == r["accel"])
        if ref is None:
            ref = find(lambda o: o["role"] == "timed" and o["backprop"] == "autograd" and same(o, r) and o["dtype"] == r["dtype"])
        if ref is not None:
            r["grad_rel_error_vs_autograd"] = relative_error(g, ref)
        base = [o for o in records if o["status"] == "ok" and o["role"] == "timed" and o["backprop"] == "autograd"
                and same(o, r) and o["dtype"] == r["dtype"] and o["accel"] == r["accel"]]
        if base:
            r["time_vs_autograd"] = r["seconds_per_iteration"] / base[0]["seconds_per_iteration"]
        ref32 = find(lambda o: o["role"] == "reference" and same(o, r))
        if ref32 is None and r["dtype"] != "float32":
            ref32 = find(lambda o: o["dtype"] == "float32" and o["backprop"] in ("checkpoint", "autograd") and same(o, r))
        if ref32 is not None and r["dtype"] != "float32":
            r["grad_rel_error_vs_fp32"] = relative_error(g, ref32)


def table(records: list[dict]) -> str:
    cols = [("sampler", "sampler", None), ("backprop", "backprop", None), ("steps", "steps", None),
            ("batch", "batch", None), ("dtype", "dtype", None), ("accel", "accel", None),
            ("s/iter", "seconds_per_iteration", "s"), ("x autograd", "time_vs_autograd", "x"),
            ("x floor", "time_vs_floor", "x"), ("n", "repeats", None), ("peak MiB", "peak_memory_bytes", "MiB"),
            ("saved KiB", "saved_bytes", "KiB"), ("unet", "unet_calls", None),
            ("err vs autograd", "grad_rel_error_vs_autograd", "e"), ("err vs fp32", "grad_rel_error_vs_fp32", "e"),
            ("drift", "reversible_drift", "e"), ("status", "status", None)]

    def edit(r, row):
        if r.get("role") == "reference":
            row[1] += "(ref)"
        if r.get("vae_checkpointing") or r.get("channels_last"):
            row[5] += "+" + "+".join(s for s, on in (("vaeckpt", r.get("vae_checkpointing")), ("cl", r.get("channels_last"))) if on)
        row[-1] = row[-1][:60]

    return text_table(cols, records, edit)


OFFICIAL = {"seconds_per_iteration": 31.91, "peak_memory_bytes": 15.24 * 2**30, "steps": 50}  # ANCHORS.md, H200


def summarize(paths: list[str]) -> str:
    """A short table of the SD-size records and the issue's targets, from one or more JSON files."""
    records = [r for p in paths if os.path.exists(p) for r in json.loads(Path(p).read_text())]
    ok = [r for r in records if r["status"] == "ok" and r["role"] == "timed"]
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    lines = [f"{'sampler/backprop':22} {'steps':>5} {'b':>2} {'dtype':>8} {'accel':>13} {'s/iter':>7} {'x official@50':>19} "
             f"{'peak GiB':>8} {'rsv GiB':>7} {'err fp32':>8} {'drift':>8}  status"]
    for r in records:
        if r["role"] != "timed":
            continue
        spi = r["seconds_per_iteration"]
        speed = "-" if spi is None else f"{r['batch'] / spi * OFFICIAL['seconds_per_iteration'] * r['steps'] / OFFICIAL['steps']:.1f}"
        accel = r["accel"] + ("+cl" if r["channels_last"] else "") + ("" if r["vae_checkpointing"] else "-novaeckpt")
        lines.append(f"{r['sampler'] + '/' + r['backprop']:22} {r['steps']:>5} {r['batch']:>2} {r['dtype']:>8} {accel:>13} "
                     f"{fmt(spi, 's'):>7} {speed:>19} {gib(r['peak_memory_bytes']):>8} {gib(r.get('peak_reserved_bytes')):>7} "
                     f"{fmt(r['grad_rel_error_vs_fp32'], 'e'):>8} {fmt(r['reversible_drift'], 'e'):>8}  {r['status'][:50]}")

    def best(pred):
        c = [r for r in ok if pred(r)]
        return min(c, key=lambda r: r["seconds_per_iteration"]) if c else None

    low = lambda r: r["dtype"] in ("float16", "bfloat16") and r["steps"] == 50  # noqa: E731
    checks = []
    d = best(lambda r: low(r) and r["batch"] == 1 and r["sampler"] == "ddim" and r["backprop"] == "checkpoint")
    e = best(lambda r: low(r) and r["batch"] == 1 and r["sampler"] == "edict")
    for name, r, limit in (("DDIM-checkpoint 50 steps b1 <= 2.5 s", d, 2.5), ("EDICT 50 steps b1 <= 6 s", e, 6.0)):
        if r is None:
            checks.append(f"{name}: not measured")
            continue
        checks.append(f"{name}: {r['seconds_per_iteration']:.2f} s ({r['backprop']}, {r['accel']}) -> "
                      f"{'MET' if r['seconds_per_iteration'] <= limit else 'NOT met'}; peak {gib(r['peak_memory_bytes'])} GiB "
                      f"allocated / {gib(r.get('peak_reserved_bytes'))} reserved -> "
                      f"{'MET' if r['peak_memory_bytes'] <= 5 * 2**30 else 'NOT met'} (<= 5 GiB)")
    for sampler, backprop in (("ddim", "checkpoint"), ("edict", "checkpoint"), ("edict", "reversible")):
        for accel, dtype in sorted({(r["accel"], r["dtype"]) for r in ok if r["dtype"] != "float32"}):
            by = {r["steps"]: r["peak_memory_bytes"] for r in ok if r["sampler"] == sampler and r["backprop"] == backprop
                  and r["batch"] == 1 and r["accel"] == accel and r["dtype"] == dtype and r["vae_checkpointing"]
                  and not r["channels_last"]}
            if len(by) >= 2:
                lo, hi = by[min(by)], by[max(by)]
                checks.append(f"flat {sampler}-{backprop} ({accel}, {dtype}) {min(by)}->{max(by)} steps: {lo / 2**30:.3f} -> "
                              f"{hi / 2**30:.3f} GiB ({100 * (hi / lo - 1):+.1f}%) -> {'MET' if abs(hi / lo - 1) <= 0.02 else 'NOT met'}")
    for sampler in ("ddim", "edict"):
        r = best(lambda r: low(r) and r["batch"] > 1 and r["sampler"] == sampler)
        if r is not None:
            x = r["batch"] / r["seconds_per_iteration"] * OFFICIAL["seconds_per_iteration"]
            checks.append(f"{sampler} batch {r['batch']} ({r['backprop']}, {r['accel']}): {x:.1f}x the official code's "
                          f"image-iterations/s -> {'MET' if x >= 15 else 'NOT met'} (>= 15x)")
    where = sorted({f"{r['model']}, {r['resolution']}px, {r['device']}" for r in records})
    head = [f"# {'; '.join(where)} (targets are stated for sd15 at 512px on one H100/H200)"]
    return "\n".join(head + lines + [""] + checks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampler steps (default 5 10 20; --quick: 2 3)")
    p.add_argument("--samplers", nargs="+", default=None, choices=SAMPLERS,
                   help="default ddim edict (flow flow_edict for SD3 / FLUX); lcm: the LCM sampler with fixed random "
                        "noises between steps (any UNet model; timing only)")
    p.add_argument("--backprops", nargs="+", default=list(BACKPROPS), choices=BACKPROPS)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="seeds per batch (one record each)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--sd-config", default="tiny", choices=architectures.ARCHITECTURES + TRANSFORMERS,
                   help="architecture with random weights (tiny; sd15, sd21, sd-turbo, sdxl, sdxl-turbo, sd35-medium, "
                        "flux-dev, flux-schnell, sana-1600m, sana-sprint, flux2-klein, qwen-image: the real released "
                        "configs; tiny-sd3, tiny-flux-*, tiny-sana, tiny-sana-sprint, tiny-flux2-klein, tiny-qwen-image: "
                        "test sizes)")
    p.add_argument("--tiny", action="store_true",
                   help="run --sd-config's tiny counterpart instead (sd35-medium -> tiny-sd3, flux-* -> tiny-flux-*, "
                        "sana-1600m -> tiny-sana, sana-sprint -> tiny-sana-sprint, flux2-klein -> tiny-flux2-klein, "
                        "qwen-image -> tiny-qwen-image; other names unchanged): the GPU scripts' CPU check")
    p.add_argument("--layers", type=int, default=None,
                   help="transformer models: build the transformer with this many blocks (FLUX.1: N double-stream + 2N "
                        "single-stream; FLUX.2: N + 4N; SD3, SANA, Qwen-Image: N) for a smoke run; default: the full "
                        "model, or on CPU, when its weights do not fit in the available memory, 1 (said in the output "
                        "and the records' note)")
    p.add_argument("--transformer-checkpointing", action="store_true",
                   help="the UNet's / transformer's own gradient checkpointing inside each step's recomputation (noted "
                        "in the records)")
    p.add_argument("--build-in-dtype", action="store_true",
                   help="create the random weights directly in --dtype (no float32 build and master copy: a model "
                        "whose float32 weights do not fit, Qwen-Image's 82 GB; the newer families only: SANA, FLUX.2, Qwen-Image); "
                        "every record must then run in --dtype")
    p.add_argument("--controlnet", action="store_true", help="add a ControlNet for the --sd-config base (random weights)")
    p.add_argument("--floor", action="store_true",
                   help="also time the iteration's floor: UNet forward, forward with VJP and VAE decode with VJP, each "
                        "alone, times what the chain needs (time_vs_floor = iteration / floor)")
    p.add_argument("--pretrained", default=None, help="hub id or local dir of a diffusers SD checkpoint")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--mix-weight", type=float, default=0.93)
    p.add_argument("--drift-tolerance", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per record (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (the first counts saved bytes)")
    p.add_argument("--max-autograd-steps", type=int, default=None, help="skip autograd above this many steps")
    p.add_argument("--grad-reference", choices=("float32", "none"), default=None,
                   help="compare each low-precision gradient with the model in float32 (default: on when --dtype is not float32)")
    p.add_argument("--reference-max-steps", type=int, default=20, help="float32 references only up to this many steps")
    p.add_argument("--vae-checkpointing", action="store_true", help="gradient checkpointing in the VAE decoder")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (accel=compile)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the UNet as CUDA graphs (accel=graphs)")
    p.add_argument("--plan", default=None, help="JSON list (or file) of record groups overriding the options above: "
                   "keys samplers, backprops, steps, batch, dtype, accel (eager|graphs|compile), channels_last, "
                   "vae_checkpointing, drift_tolerance, repeats, warmup, budget, max_autograd_steps")
    p.add_argument("--record-budget", type=float, default=None, help="stop timing a record after this many seconds (>= 1 repeat)")
    p.add_argument("--deadline", type=float, default=None, help="skip records that would end after this many seconds")
    p.add_argument("--isolate", choices=("auto", "subprocess", "none"), default="auto",
                   help="run each record in a fresh subprocess (auto: on CPU) so peak RSS is its own")
    p.add_argument("--interleave", action="store_true",
                   help="alternate the timed iterations of the backprop modes of each case (in-process): fair time "
                        "ratios on a busy machine; peaks are then the process's")
    p.add_argument("--subprocess-timeout", type=float, default=1800)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1 for the tiny model on CPU: tiny ops only lose to threading)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 (off: float32 means float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: steps 2 3, 1 repeat, no warm-up, in-process")
    p.add_argument("--json", default=None, help="write the records here (rewritten after every record)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON", help="print the short table of these files and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = args.steps or [2, 3], 1, 0
        if args.isolate == "auto":
            args.isolate = "none"
    args.steps = args.steps or [5, 10, 20]
    if args.tiny:
        args.sd_config = TINY.get(args.sd_config, args.sd_config)
    flow = args.sd_config in TRANSFORMERS and not args.pretrained
    if args.pretrained:
        flow = issubclass(backbone_class(args.pretrained), FlowBackbone)
    default = family_models.FAMILY_DEFAULT_SAMPLERS.get(args.sd_config) if not args.pretrained else None
    args.samplers = args.samplers or default or (["flow", "flow_edict"] if flow else ["ddim", "edict"])
    if args.threads is None and torch.device(args.device).type == "cpu" and args.sd_config == "tiny" and not args.pretrained:
        args.threads = 1
    args.accel = "compile" if args.compile else ("graphs" if args.cuda_graphs else "eager")
    if args.compile and args.cuda_graphs:
        p.error("--compile and --cuda-graphs are exclusive (use --compile-mode reduce-overhead for compiled graphs)")
    if args.grad_reference is None:
        args.grad_reference = "none" if args.dtype == "float32" else "float32"
    if args.build_in_dtype and args.dtype != "float32" and (args.grad_reference == "float32" or args.plan):
        p.error("--build-in-dtype builds the weights in --dtype only: give --grad-reference none and no --plan")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return []
    if args.worker is not None:
        worker_main(args.worker)
        return []
    if args.sd_config in TRANSFORMERS and not args.pretrained:
        args.layers = flow_layers(args)  # once, here: every record (and subprocess) builds the same model
    _setup_torch(args)
    start = time.perf_counter()
    jobs = make_jobs(args)
    isolate = args.isolate == "subprocess" or (args.isolate == "auto" and torch.device(args.device).type == "cpu")
    print(f"# {len(jobs)} records on {args.device}: {machine_description(args.device)}; model {args.pretrained or args.sd_config}, "
          f"{'one subprocess per record' if isolate else 'in-process'}", flush=True)
    model = None
    if not isolate:
        model = Model(args)
        print(f"# model built in {model.build_seconds:.1f}s", flush=True)
    records, grads = [], []
    tmp = tempfile.mkdtemp(prefix="doodl-bench-")
    if args.interleave:
        if isolate:
            raise SystemExit("--interleave runs in one process: add --isolate none")
        groups: dict = {}
        for job in jobs:  # same record but for the backprop mode: one group
            groups.setdefault(tuple(job[k] for k in JOB_KEYS if k != "backprop"), []).append(job)
        for group in groups.values():
            try:
                pairs = run_interleaved(model, group, args)
            except Exception as e:
                traceback.print_exc()
                pairs = []
                for job in group:
                    rec = _base_record(job, args, model)
                    rec["status"] = "oom" if isinstance(e, torch.OutOfMemoryError) else f"error: {type(e).__name__}: {str(e)[:200]}"
                    pairs.append((rec, None))
            free(model.device)
            for rec, grad in pairs:
                records.append(rec)
                grads.append(grad)
            attach_errors(records, grads)
            print(f"[{time.perf_counter() - start:6.1f}s] interleaved {group[0]['sampler']} steps={group[0]['steps']} "
                  + ", ".join(f"{r['backprop']} {fmt(r['seconds_per_iteration'], 's')} s" for r, _ in pairs), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(records, indent=1))
        jobs = []
    for n, job in enumerate(jobs):
        elapsed = time.perf_counter() - start
        predicted = _predict_seconds(job, records)
        if args.deadline is not None and (elapsed > args.deadline or (predicted is not None and elapsed + predicted > args.deadline)):
            rec, grad = _base_record(job, args, model), None
            rec["status"] = f"skipped: deadline ({elapsed:.0f}s elapsed, ~{predicted or 0:.0f}s needed)"
        elif isolate:
            rec, grad = run_subprocess(job, args, os.path.join(tmp, f"grad{n}.pt"))
        else:
            try:
                rec, grad = run_job(model, job, args)
            except torch.OutOfMemoryError as e:
                rec, grad = _base_record(job, args, model), None
                rec["status"] = "oom"
                if torch.cuda.is_available():
                    rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                print(f"# OOM: {str(e).splitlines()[0][:200]}", flush=True)
            except Exception as e:  # one broken record must not stop the others
                rec, grad = _base_record(job, args, model), None
                rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            free(model.device)
        records.append(rec)
        grads.append(grad)
        attach_errors(records, grads)
        print(f"[{time.perf_counter() - start:6.1f}s] {job['sampler']}/{job['backprop']} steps={job['steps']} batch={job['batch']} "
              f"{job['dtype']} {job['accel']} ({job['role']}): {rec['status']} "
              f"{fmt(rec['seconds_per_iteration'], 's')} s/iter, peak {fmt(rec['peak_memory_bytes'], 'MiB')} MiB", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))
    print(table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
