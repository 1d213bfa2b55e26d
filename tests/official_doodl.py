"""The official DOODL equations, transcribed into plain torch for parity tests (batch 1, any dtype).

Written from reading salesforce/DOODL at commit 52a52da (``doodl.py``, ``helper_functions.py`` and its
vendored ``my_half_diffusers/schedulers/scheduling_ddim.py``); line numbers below refer to that commit.
Nothing here imports doodl_lightning's samplers, schedules or optimiser: it is an independent second
implementation kept deliberately close to the official control flow (index juggling included), so a
mismatch points at us. The official code's globals (unet, vae, text encoder) become arguments, its
memcnn wrappers plain calls (memcnn only changes memory, not values), and its global-RNG draws
(perturbation, VAE posterior sample) are passed in, since our RNG is per item by design.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

VAE_SCALE = 0.18215  # hard-coded in doodl.py (l. 513, 911)


class OfficialScheduler:
    """The DDIMScheduler doodl.py builds (l. 41-48): SD betas, clip_sample off, set_alpha_to_one off,
    ``set_timesteps(N)`` with offset 0 (scheduling_ddim.py l. 141-161)."""

    def __init__(self, num_inference_steps: int, num_train_timesteps: int = 1000):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = self.alphas_cumprod[0]  # set_alpha_to_one=False
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_steps = num_inference_steps
        self.timesteps = list(range(0, num_train_timesteps, num_train_timesteps // num_inference_steps))[::-1]


def get_alpha_and_beta(t: float, s: OfficialScheduler) -> tuple[float, float]:
    """helper_functions.py l. 31-38 (the integer branch; the fractional one is never reached for N | 1000)."""
    if t < 0:
        a = float(s.final_alpha_cumprod)
        return a, 1 - a
    assert t == int(t), "fractional timesteps (steps not dividing 1000) are not transcribed"
    a = float(s.alphas_cumprod[int(t)])
    return a, 1 - a


def forward_step(s: OfficialScheduler, model_output, timestep: int, sample):
    """helper_functions.py l. 54-79."""
    prev_timestep = timestep - s.num_train_timesteps / s.num_inference_steps
    alpha_prod_t, beta_prod_t = get_alpha_and_beta(timestep, s)
    alpha_prod_t_prev, _ = get_alpha_and_beta(prev_timestep, s)
    alpha_quotient = (alpha_prod_t / alpha_prod_t_prev) ** 0.5
    first_term = (1.0 / alpha_quotient) * sample
    second_term = (1.0 / alpha_quotient) * (beta_prod_t**0.5) * model_output
    third_term = ((1 - alpha_prod_t_prev) ** 0.5) * model_output
    return first_term - second_term + third_term


def reverse_step(s: OfficialScheduler, model_output, timestep: int, sample):
    """helper_functions.py l. 82-108."""
    prev_timestep = timestep - s.num_train_timesteps / s.num_inference_steps
    alpha_prod_t, beta_prod_t = get_alpha_and_beta(timestep, s)
    alpha_prod_t_prev, _ = get_alpha_and_beta(prev_timestep, s)
    alpha_quotient = (alpha_prod_t / alpha_prod_t_prev) ** 0.5
    first_term = alpha_quotient * sample
    second_term = (beta_prod_t**0.5) * model_output
    third_term = alpha_quotient * ((1 - alpha_prod_t_prev) ** 0.5) * model_output
    return first_term + second_term - third_term


class Official:
    """The official EDICT stepping and mixing layers and the DOODL loop, over a given UNet and VAE."""

    def __init__(self, unet, vae, e_uc, e_c, steps: int, guidance_scale: float = 7.5, mix_weight: float = 0.93):
        self.unet, self.vae, self.e_uc, self.e_c = unet, vae, e_uc, e_c
        self.scheduler = OfficialScheduler(steps)
        self.num_timesteps = steps
        self.guidance_scale, self.p = guidance_scale, mix_weight

    # -- SteppingLayer.forward (doodl.py l. 55-132) ------------------------------------------------
    def stepping(self, i: int, t: int, latent_pair, reverse: bool = False, clip_cond_fn=None):
        first_output = second_output = None
        for base_latent_i in range(2):
            if reverse:
                orig_i = self.num_timesteps - (i + 1)
                offset = (orig_i + 1) % 2
            else:
                offset = i % 2
            latent_i = (base_latent_i + offset) % 2
            latent_j = (latent_i + 1) % 2
            latent_model_input = latent_pair[latent_j:latent_j + 1] if base_latent_i == 0 else first_output
            latent_base = latent_pair[latent_i:latent_i + 1]
            tt = torch.tensor(t, dtype=torch.float64)
            noise_pred_uncond = self.unet(latent_model_input, tt, encoder_hidden_states=self.e_uc).sample
            noise_pred_cond = self.unet(latent_model_input, tt, encoder_hidden_states=self.e_c).sample
            noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_cond - noise_pred_uncond)
            if clip_cond_fn is not None:  # l. 100-105
                clip_grad = clip_cond_fn(latent_model_input, t)
                _, beta_prod_t = get_alpha_and_beta(t, self.scheduler)
                noise_pred = noise_pred - beta_prod_t**0.5 * clip_grad
            step_call = reverse_step if reverse else forward_step
            new_latent = step_call(self.scheduler, noise_pred, t, latent_base)
            if base_latent_i == 0:
                first_output = new_latent
            else:
                second_output = new_latent
                combined = (torch.cat([first_output, second_output]) if latent_i == 1
                            else torch.cat([second_output, first_output]))
        return combined

    # -- MixingLayer (l. 152-162) ------------------------------------------------------------------
    def mix(self, x):
        x0, x1 = x[:1], x[1:]
        x0 = self.p * x0 + (1 - self.p) * x1
        x1 = (1 - self.p) * x0 + self.p * x1
        return torch.cat([x0, x1])

    def mix_inverse(self, x):
        x0, x1 = x[:1], x[1:]
        x1 = (x1 - (1 - self.p) * x0) / self.p
        x0 = (x0 - (1 - self.p) * x1) / self.p
        return torch.cat([x0, x1])

    # -- chains --------------------------------------------------------------------------------------
    def run(self, latent_pair, timesteps, clip_cond_fn=None):
        """``for i, t in enumerate(timesteps): s(i, t, pair); mix(pair)`` (l. 463-471, 872-881, 901-909)."""
        for i, t in enumerate(timesteps):
            latent_pair = self.stepping(i, t, latent_pair, clip_cond_fn=clip_cond_fn)
            latent_pair = self.mix(latent_pair)
        return latent_pair

    def invert(self, init_latent):
        """Editing's EDICT inversion (l. 854-864): mix.inverse then s.inverse over the flipped grid."""
        latent_pair = init_latent.repeat(2, 1, 1, 1)
        for i, t in enumerate(self.scheduler.timesteps[::-1]):
            latent_pair = self.mix_inverse(latent_pair)
            latent_pair = self.stepping(i, t, latent_pair, reverse=True)
        return latent_pair

    def decode(self, latent):
        return self.vae.decode(latent / VAE_SCALE).sample

    # -- the DOODL loop (gen(), latent_traversal=True, l. 836-982) ---------------------------------
    def doodl(self, loss_fn: Callable, latent, num_traversal_steps: int, noise: Callable[[int], torch.Tensor], *,
              tied_latents=True, use_momentum=True, use_nesterov=False, renormalize_latents=True,
              optimize_first_edict_image_only=False, opt_t=None, perturb_grad_scale=1e-4, clip_grad_val=1e-3,
              latent_pair=None):
        """``loss_fn`` returns loss * grad_scale; ``noise(m)`` the perturbation's N(0, I) draw at step m.

        ``latent_pair`` (editing) replaces the pair [latent, latent]. Returns the pair after the loop.
        """
        if use_nesterov:
            use_momentum = True
        if latent_pair is None:
            latent_pair = torch.cat([latent.clone(), latent.clone()])
        if renormalize_latents:
            orig_norm = latent.norm().item()
        timesteps = self.scheduler.timesteps
        prev_b_arr = [None, None]
        if opt_t is not None:  # l. 866-885
            initial_timesteps = timesteps[:-1 * opt_t] if opt_t != 0 else timesteps
            timesteps = timesteps[-1 * opt_t:] if opt_t != 0 else []
            with torch.no_grad():
                latent_pair = self.run(latent_pair, initial_timesteps)
            if tied_latents:
                combined_l = 0.5 * (latent_pair[0] + latent_pair[1])
                latent_pair = combined_l.repeat(2, 1, 1, 1)
        for m in range(num_traversal_steps):
            orig_latent_pair = latent_pair.clone().detach().requires_grad_(True)
            input_latent_pair = self.run(orig_latent_pair.clone(), timesteps)
            ims = [self.decode(lat) for lat in input_latent_pair.chunk(2)]
            losses = []
            for im in ims:
                losses.append(loss_fn(im))
                if optimize_first_edict_image_only:
                    break
            sum(losses).backward()
            grad = -0.5 * orig_latent_pair.grad
            if tied_latents:
                grad = grad.mean(dim=0, keepdim=True).repeat(2, 1, 1, 1)
            new_latents = []
            perturbation = perturb_grad_scale * noise(m) if perturb_grad_scale else 0
            for grad_idx, (g, lat) in enumerate(zip(grad.chunk(2), orig_latent_pair.detach().chunk(2))):
                if clip_grad_val is not None:
                    g = g.clip(-clip_grad_val, clip_grad_val)
                if use_momentum:
                    mom = 0.9
                    b = g if m == 0 else mom * prev_b_arr[grad_idx] + g
                    g = g + mom * b if use_nesterov else b
                    prev_b_arr[grad_idx] = b.clone()
                new_latents.append((lat + g + perturbation).clone())
            if tied_latents:
                combined_l = 0.5 * (new_latents[0] + new_latents[1])
                latent_pair = combined_l.repeat(2, 1, 1, 1)
            else:
                latent_pair = torch.cat(new_latents)
            if renormalize_latents:
                for norm_i in range(2):
                    latent_pair[norm_i] = latent_pair[norm_i] * orig_norm / latent_pair[norm_i].norm().item()
        return latent_pair.detach()

    # -- latent_traversal=False: guidance at every step (get_generic_cond_fn, l. 403-522) ------------
    def cond_fn(self, loss_fn: Callable, one_step_baseline: bool):
        def fn(x, t):
            with torch.enable_grad():
                lat = x.clone().detach().requires_grad_(True)
                start_i = self.scheduler.timesteps.index(t)
                if one_step_baseline:  # l. 492-503
                    tt = torch.tensor(t, dtype=torch.float64)
                    internal_noise_pred = self.unet(lat, tt, encoder_hidden_states=self.e_uc).sample
                    alpha_prod_t, beta_prod_t = get_alpha_and_beta(t, self.scheduler)
                    fac = beta_prod_t**0.5
                    pred_original_sample = (lat - fac * internal_noise_pred) / (alpha_prod_t**0.5)
                    sample = pred_original_sample * fac + lat * (1 - fac)
                    pred_original_pair = sample.repeat(2, 1, 1, 1)
                else:  # l. 447-472: the rest of the chain, its leapfrog order restarting at 0
                    pred_original_pair = self.run(torch.cat([lat.clone(), lat.clone()]),
                                                  self.scheduler.timesteps[start_i:])
                for k, sample in enumerate(pred_original_pair.chunk(2)):
                    # memcnn's wrappers (num_bwd_passes=2) let the shared chain be back-propagated twice
                    loss_fn(self.decode(sample)).backward(retain_graph=k == 0)
                    if one_step_baseline:
                        break
                return (-1 if one_step_baseline else -0.5) * lat.grad
        return fn

    def guided_sample(self, loss_fn: Callable, latent, one_step_baseline: bool):
        """gen(latent_traversal=False) without editing (l. 987-1054): returns the decoded first image."""
        with torch.no_grad():
            pair = self.run(torch.cat([latent.clone(), latent.clone()]), self.scheduler.timesteps,
                            clip_cond_fn=self.cond_fn(loss_fn, one_step_baseline))
            return self.decode(pair[:1])


# == the baselines' other branches (latent_traversal=False) ===================================
# ``single_variable=True`` (DDIM sampling) and the editing branch (``source_im``, with its ``opt_t``).

def stepping_single_variable(off: Official, t: int, latent_pair, clip_cond_fn=None):
    """SteppingLayer.forward with ``single_variable=True`` (doodl.py l. 76-79, 119-121): both latent
    indices are forced to 0, so the first pass is one DDIM step of latent 0 with eps (and guidance) from
    itself; its output is that latent twice, and the loop is left before the second pass."""
    latent_model_input = latent_pair[0:1]
    latent_base = latent_pair[0:1]
    tt = torch.tensor(t, dtype=torch.float64)
    noise_pred_uncond = off.unet(latent_model_input, tt, encoder_hidden_states=off.e_uc).sample
    noise_pred_cond = off.unet(latent_model_input, tt, encoder_hidden_states=off.e_c).sample
    noise_pred = noise_pred_uncond + off.guidance_scale * (noise_pred_cond - noise_pred_uncond)
    if clip_cond_fn is not None:  # l. 100-105, as in the coupled step
        clip_grad = clip_cond_fn(latent_model_input, t)
        _, beta_prod_t = get_alpha_and_beta(t, off.scheduler)
        noise_pred = noise_pred - beta_prod_t**0.5 * clip_grad
    new_latent = forward_step(off.scheduler, noise_pred, t, latent_base)
    return torch.cat([new_latent, new_latent])


def guided_sample_single_variable(off: Official, loss_fn: Callable, latent, one_step_baseline: bool):
    """gen(latent_traversal=False, single_variable=True) without editing (l. 986-1054): the mixing layer
    is ``torch.nn.Identity`` (l. 809-810) and the steps are ``stepping_single_variable``. The
    conditioning function is the SAME ``get_generic_cond_fn`` (l. 791-799), whose internal stepping
    layer is built without ``single_variable`` (l. 433-438): the chain estimate still differentiates
    through EDICT from [l, l], both images scored, x (-0.5) (``Official.cond_fn``)."""
    with torch.no_grad():
        pair = torch.cat([latent.clone(), latent.clone()])
        cond = off.cond_fn(loss_fn, one_step_baseline)
        for t in off.scheduler.timesteps:
            pair = stepping_single_variable(off, t, pair, clip_cond_fn=cond)  # then mix = Identity
        return off.decode(pair[:1])


def baseline_edit(off: Official, init_latent, opt_t=None):
    """gen(latent_traversal=False, source_im=..., single_variable=False) without guidance (l. 1008-1051):
    ``opt_t`` DROPS the first opt_t steps (``timesteps[opt_t:]``, l. 1009-1010; the traversal branch keeps
    the last opt_t instead), and the inversion calls the stepping layer's inverse only: the mixing
    layer's inverse is commented out (l. 1029), while the forward loop after it mixes (l. 1049-1050).
    The stepping layer keeps ``num_timesteps=steps`` for its reverse order (l. 996-1001). Returns the
    decoded first image."""
    timesteps = off.scheduler.timesteps
    if opt_t is not None:
        timesteps = timesteps[opt_t:]
    with torch.no_grad():
        latent_pair = init_latent.repeat(2, 1, 1, 1)
        for i, t in enumerate(timesteps[::-1]):
            latent_pair = off.stepping(i, t, latent_pair, reverse=True)
        return off.decode(off.run(latent_pair, timesteps)[:1])


# == end of the baselines' branches ======================================================================================


def mirror_loss_fn(grad_scale: float):
    """doodl.py l. 322-337 (horizontal)."""
    return lambda im_pix: grad_scale * F.mse_loss(im_pix, im_pix.flip(-1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


__all__ = ["Official", "OfficialScheduler", "mirror_loss_fn", "relative", "VAE_SCALE"]


# =====================================================================================================
# Official guidance losses: doodl.py l. 166-200 (MakeCutouts, spherical_dist_loss),
# l. 207-319 (clip_loss_fn, text and visual targets), l. 341-400 (fgvc_loss_fn) and l. 553-650
# (aesthetic_score, aesthetic_loss_fn), as gen() calls them (l. 756-790: use_cutouts=True, num_cuts=16,
# cut_power=0.3). The models become arguments: ``encode_image`` / ``encode_text`` stand for
# ``get_image_features`` / ``get_text_features`` (or open_clip's ``encode_image``), ``amodel`` for the
# LAION linear head, ``net`` for WS-DAN (three outputs, the logits last). The fixed 224 / 512 px input sizes
# and the normalisation constants are parameters (defaults: the official values), so a tiny test model fits.
# MakeCutouts' global-RNG draws (torch.rand, torch.randint) come from ``rng``, handed over by the caller.
# torchvision 0.12 (the official environment's pin) is transcribed where its transforms run on tensors.
# =====================================================================================================

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # doodl.py l. 255, 577
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # l. 374
IMAGENET_STD = (0.229, 0.224, 0.225)


class GlobalRNG:
    """The draws MakeCutouts makes from torch's global RNG (``torch.rand([])``, ``torch.randint(lo, hi, ())``)."""

    def rand(self) -> float:
        return float(torch.rand([]))

    def randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, ()))


class MakeCutouts:
    """doodl.py l. 166-188 (after diffusers' clip_guided_stable_diffusion)."""

    def __init__(self, cut_size: int, cut_power: float = 1.0, rng=None):
        self.cut_size, self.cut_power = cut_size, cut_power
        self.rng = rng or GlobalRNG()

    def __call__(self, pixel_values, num_cutouts: int):
        sideY, sideX = pixel_values.shape[2:4]
        max_size = min(sideX, sideY)
        min_size = min(sideX, sideY, self.cut_size)
        cutouts = []
        for _ in range(num_cutouts):
            size = int(self.rng.rand() ** self.cut_power * (max_size - min_size) + min_size)
            offsetx = self.rng.randint(0, sideX - size + 1)
            offsety = self.rng.randint(0, sideY - size + 1)
            cutout = pixel_values[:, :, offsety:offsety + size, offsetx:offsetx + size]
            cutouts.append(F.adaptive_avg_pool2d(cutout, self.cut_size))
        return torch.cat(cutouts)


def spherical_dist_loss(x, y):
    """l. 190-200: the MINIMUM distance as soon as there is more than one."""
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    dist = (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)
    if dist.numel() > 1:
        return dist.min()
    return dist


def tv_normalize(x, mean, std):
    """torchvision.transforms.Normalize on a (B, C, H, W) or (C, H, W) tensor: (x - mean) / std per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def tv_resize(img, size: int):
    """torchvision 0.12 ``Resize(size)`` on a tensor: the shorter side to ``size`` (the longer one truncated),
    bilinear, align_corners=False, no antialiasing (tensor default of that version); unchanged when it fits."""
    h, w = img.shape[-2:]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (w <= h and w == size) or (h <= w and h == size):
        return img
    squeeze = img.ndim == 3
    out = F.interpolate(img[None] if squeeze else img, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return out[0] if squeeze else out


def tv_center_crop(img, size: int):
    """torchvision ``CenterCrop(size)`` of an image at least ``size`` on each side."""
    h, w = img.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[..., top:top + size, left:left + size]


def tv_to_tensor(im, dtype=torch.float64):
    """torchvision ``ToTensor`` of an 8-bit PIL image: (C, H, W) in [0, 1] (official: float32; here any dtype)."""
    import numpy as np

    arr = torch.from_numpy(np.array(im, np.uint8, copy=True))
    arr = arr.view(im.size[1], im.size[0], len(im.getbands())).permute(2, 0, 1).contiguous()
    return arr.to(dtype).div(255)


def clip_text_target(encode_text, text_ids):
    """l. 259-272: ``get_text_features(ids)[0]``, normalised."""
    z_t = encode_text(text_ids)[0]
    return z_t / z_t.norm(p=2, dim=-1, keepdim=True)


def clip_image_target(encode_image, paths, target_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, dtype=torch.float64):
    """l. 273-295: load_transform (ToTensor, Resize, CenterCrop, Normalize) per image, grayscale (one-band) images
    skipped, features normalised, averaged, normalised again."""
    from PIL import Image

    ims = []
    for p in paths:
        im = Image.open(p)
        if len(im.getbands()) == 1:
            continue  # "Skipping grayscale"
        ims.append(tv_normalize(tv_center_crop(tv_resize(tv_to_tensor(im, dtype), target_size), target_size),
                                mean, std))
    z_t = encode_image(torch.stack(ims))
    z_t = z_t / z_t.norm(p=2, dim=-1, keepdim=True)
    z_t = z_t.mean(dim=0, keepdim=True)
    return z_t / z_t.norm(p=2, dim=-1, keepdim=True)


def clip_loss_fn(encode_image, z_t, use_cutouts: bool = True, num_cuts: int = 16, cut_power: float = 0.3,
                 grad_scale: float = 1.0, target_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, rng=None,
                 weights=(1,)):
    """l. 207-319's ``loss_fn`` for one model (``clip_model_str`` selects one; ``weights`` default [1])."""
    if use_cutouts:
        cut = MakeCutouts(cut_size=target_size, cut_power=cut_power, rng=rng)

    def loss_fn(im_pix):
        im_pix = ((im_pix / 2) + 0.5).clamp(0, 1)
        x_var = cut(im_pix, num_cuts) if use_cutouts else tv_resize(im_pix, target_size)
        x_var = tv_normalize(x_var, mean, std)
        z_is = [encode_image(x_var)]
        z_is = [z_i / z_i.norm(p=2, dim=-1, keepdim=True) for z_i in z_is]
        dists_arr = [spherical_dist_loss(z_i, z_t) for z_i in z_is]
        losses = [dists.mean() for dists in dists_arr]
        loss = sum([l * w for l, w in zip(losses, weights)]) / sum(weights)
        return loss * grad_scale

    return loss_fn


def aesthetic_score(image, encode_image, amodel):
    """l. 553-568 (its autocast only changes precision)."""
    image_features = encode_image(image)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    return amodel(image_features).clip(1, 10).mean()


def aesthetic_loss_fn(encode_image, amodel, aesthetic_target=None, use_cutouts: bool = True, num_cuts: int = 16,
                      cut_power: float = 0.3, grad_scale: float = 1.0, target_size: int = 224, mean=CLIP_MEAN,
                      std=CLIP_STD, rng=None, weights=(1, 1)):
    """l. 570-650 with one model (``clip_model_str`` 'vit_l_14'; gen()'s ``weights`` default [1, 1])."""
    if use_cutouts:
        cut = MakeCutouts(cut_size=target_size, cut_power=cut_power, rng=rng)

    def loss_fn(im_pix):
        im_pix = ((im_pix / 2) + 0.5).clamp(0, 1)
        x_var = cut(im_pix, num_cuts) if use_cutouts else tv_resize(im_pix, target_size)
        x_var = tv_normalize(x_var, mean, std)
        predictions = [aesthetic_score(x_var, encode_image, amodel)]
        prediction = sum([w * p for w, p in zip(weights, predictions)]) / len(predictions)
        if aesthetic_target is None:
            loss = -1 * prediction
        else:
            loss = abs(prediction - aesthetic_target)
        return loss * grad_scale

    return loss_fn


def fgvc_loss_fn(net, class_idx: int = 0, use_cutouts: bool = True, num_cuts: int = 16, cut_power: float = 0.3,
                 grad_scale: float = 1.0, target_size: int = 512, mean=IMAGENET_MEAN, std=IMAGENET_STD, rng=None):
    """l. 341-400: WS-DAN's third output is the classification; mean cross-entropy over the cutouts."""
    if use_cutouts:
        cut = MakeCutouts(cut_size=target_size, cut_power=cut_power, rng=rng)

    def loss_fn(im_pix):
        im_pix = ((im_pix / 2) + 0.5).clamp(0, 1)
        x_var = cut(im_pix, num_cuts) if use_cutouts else tv_resize(im_pix, target_size)
        x_var = tv_normalize(x_var, mean, std)
        _, _, output = net(x_var)
        target = (class_idx * torch.ones(output.size(0))).to(output.device).long()
        loss = torch.nn.functional.cross_entropy(output, target)
        return grad_scale * loss

    return loss_fn


__all__ += ["GlobalRNG", "MakeCutouts", "spherical_dist_loss", "clip_text_target", "clip_image_target", "clip_loss_fn",
            "aesthetic_score", "aesthetic_loss_fn", "fgvc_loss_fn", "tv_resize", "tv_center_crop", "tv_to_tensor",
            "tv_normalize"]
