"""FK steering (particles): the resampler and the whole steered chain against a transcription of the reference code
(``official_fk.py``), its link to best-of-N, per-item determinism, resume and compute counts."""
from __future__ import annotations

import pytest
import torch

from doodl_lightning.data import step_generator
from doodl_lightning.particles import FKResampler, ddim_eta_step, resampling_steps
from official_fk import FKD, fk_denoising_loop
from test_noise_search import StopAfter


def _rewards(steps: int, k: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(steps, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("potential", ["diff", "max", "add", "rt"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_fk_resampler_matches_the_reference(potential, adaptive):
    """The same rewards, the same multinomial generator: the same ancestors, carried rewards and products of
    potentials at every step (weights unclamped: lambda x reward stays far below the reference's 1e10 clamp)."""
    steps, k, lmbda, every, start = 7, 5, (12.0 if adaptive else 3.0), 2, 1
    rewards = _rewards(steps, k, seed=11)
    step = {"i": 0}
    ref = FKD(potential_type=potential, lmbda=lmbda, num_particles=k, adaptive_resampling=adaptive,
              resample_frequency=every, resampling_t_start=start, resampling_t_end=steps, time_steps=steps,
              reward_fn=lambda _: rewards[step["i"]], generator=torch.Generator().manual_seed(5))
    ours = FKResampler(1, k, potential, lmbda, steps, adaptive)
    gen = [torch.Generator().manual_seed(5)]
    at = resampling_steps(steps, every, start, steps)
    assert at == [1, 3, 5, 6]
    ref_particles, our_particles, resampled = torch.arange(k), torch.arange(k), 0
    for i in range(steps):
        step["i"] = i
        new_ref, _ = ref.resample(sampling_idx=i, latents=ref_particles, x0_preds=torch.zeros(k))
        if i in at:
            idx = ours.resample(i, rewards[i].unsqueeze(0), gen)[0]
            our_particles = our_particles[idx]
            resampled += int(not torch.equal(idx, torch.arange(k)))
        ref_particles = new_ref
        assert torch.equal(our_particles, ref_particles), f"step {i}"
        torch.testing.assert_close(ours.rewards[0], ref.population_rs.double(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.log_product[0].exp(), ref.product_of_potentials.double(), rtol=1e-5, atol=0)
    assert resampled >= 1, "a parity test in which nothing was resampled shows little"


def test_fk_resampler_is_defined_where_the_reference_weights_underflow():
    """lambda x reward differences of -2000: every reference weight underflows to 0 and its multinomial fails; the
    framework's log weights shifted by their maximum resample as the reference does at a 100x smaller lambda with the
    same rewards shifted (``diff`` weights are invariant to a common shift of the rewards)."""
    k = 4
    r = torch.tensor([[-200.0, -201.0, -200.5, -203.0]], dtype=torch.float64)
    ref = FKD(potential_type="diff", lmbda=10.0, num_particles=k, adaptive_resampling=False, resample_frequency=1,
              resampling_t_start=0, resampling_t_end=3, time_steps=3, reward_fn=lambda _: r[0],
              generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        ref.resample(sampling_idx=0, latents=torch.arange(k), x0_preds=torch.zeros(k))
    ours = FKResampler(1, k, "diff", 10.0, 3)
    idx = ours.resample(0, r, [torch.Generator().manual_seed(0)])
    ref = FKD(potential_type="diff", lmbda=10.0, num_particles=k, adaptive_resampling=False, resample_frequency=1,
              resampling_t_start=0, resampling_t_end=3, time_steps=3, reward_fn=lambda _: r[0] + 200.0,
              generator=torch.Generator().manual_seed(0))
    expected, _ = ref.resample(sampling_idx=0, latents=torch.arange(k), x0_preds=torch.zeros(k))
    assert torch.equal(idx[0], expected) and bool((idx[0] == 0).any())


def test_ddim_eta_step_is_diffusers_ddim_with_eta():
    from diffusers import DDIMScheduler

    from doodl_lightning.sampling import Schedule

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=0)
    sched.set_timesteps(5)
    ours = Schedule.from_scheduler(sched, 5, "official")
    assert list(ours.timesteps) == [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for i, t in enumerate(sched.timesteps):
        for eta in (0.0, 0.5, 1.0):
            want = sched.step(eps, t, x, eta=eta, variance_noise=z)
            got, x0 = ddim_eta_step(eps, x, ours, i, eta, z)
            # diffusers keeps abar in float32 (ours: float64), 1e-6 apart; a wrong term would be O(0.1) off
            torch.testing.assert_close(got, want.prev_sample, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x0, want.pred_original_sample, rtol=1e-5, atol=1e-5)


# -- the steered chain on a tiny model -----------------------------------------------------------------------
PROMPTS = ["a red circle", "a blue square"]


def _fk(tiny_pipeline_dir, **kw):
    from doodl_lightning.fk_steering import FKSteering
    from doodl_lightning.guidance import SymmetryGuidance

    args = dict(model=tiny_pipeline_dir, prompts=PROMPTS, seeds=[3], steps=4, guidance_scale=3.0, particles=3,
                lmbda=200.0, resample_every=1, resample_start=0, guidance=[SymmetryGuidance()])
    return FKSteering(**{**args, **kw})


@pytest.mark.parametrize("potential,adaptive", [("diff", False), ("max", False), ("add", True), ("rt", False)])
def test_fk_steering_matches_the_reference_pipeline(tiny_pipeline_dir, potential, adaptive):
    """One FK run of two items against the reference's denoising loop (diffusers' own DDIMScheduler with eta and
    the transcribed ``FKD``) with each item's prompt, particles, scheduler noise and multinomial generator: the
    same kept final latent and image per item. lambda is large enough that resampling changes the particles."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from doodl_lightning.best_of_n import candidate_noise

    m = _fk(tiny_pipeline_dir, potential=potential, adaptive_resampling=adaptive).prepare("cpu")
    ev, final, _ = m.run(0, [0, 1])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    sched = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=0, set_alpha_to_one=False,
                                      timestep_spacing="leading", clip_sample=False)
    sched.set_timesteps(4)
    assert [int(t) for t in sched.timesteps] == list(m.chain.schedule.timesteps)
    guide = m.guidance[0]
    k, shape = 3, m.latent_shape
    moved = 0
    for j, it in enumerate(m.local_items):
        cond, uncond = pipe.encode_prompt(it.prompt, "cpu", 1, True, negative_prompt="")
        gen = step_generator(it, 0, stream=5)
        noises = [torch.randn(k, *shape, generator=gen) for _ in range(4)]

        def decode(z):
            return pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample

        def reward(images, it=it):
            return -guide(images, prompts=[it.prompt] * k, generators=[step_generator(it, 0, stream=1)] * k)

        fkd = FKD(potential_type=potential, lmbda=200.0, num_particles=k, adaptive_resampling=adaptive,
                  resample_frequency=1, resampling_t_start=0, resampling_t_end=4, time_steps=4, reward_fn=reward,
                  latent_to_decode_fn=decode, generator=step_generator(it, 0, stream=6))
        x = torch.stack([candidate_noise(it, p, shape) for p in range(k)])
        resample = fkd.resample

        def counted(**kw):  # how often the reference's resampling changed the particles
            nonlocal moved
            out = resample(**kw)
            moved += int(not torch.equal(out[0], kw["latents"]))
            return out

        fkd.resample = counted
        out = fk_denoising_loop(pipe.unet, sched, cond, uncond, 3.0, x, 1.0, lambda i: noises[i], fkd)
        with torch.no_grad():
            best = int(reward(decode(out)).argmax())
        torch.testing.assert_close(final[j], out[best], rtol=1e-4, atol=1e-5)
    assert moved >= 1, "resampling copied no particle: the test would not see a wrong resampler"


def test_fk_steering_without_resampling_is_best_of_k(tiny_pipeline_dir):
    """eta 0 and lambda 0 with no intermediate resampling (the last step's check finds uniform weights): k
    unsteered DDIM chains from best-of-N's first k candidates, the best kept. So FK's result is best-of-k's."""
    from doodl_lightning.best_of_n import BestOfN
    from doodl_lightning.guidance import SymmetryGuidance

    fk = _fk(tiny_pipeline_dir, eta=0.0, lmbda=0.0, resample_start=100, seeds=[0, 1]).prepare("cpu")
    ev, final, start = fk.run(0, list(range(len(fk.local_items))))
    bon = BestOfN(model=tiny_pipeline_dir, prompts=PROMPTS, seeds=[0, 1], steps=4, guidance_scale=3.0, candidates=3, sampler="ddim",
                  guidance=[SymmetryGuidance()]).prepare("cpu")
    losses = torch.stack([bon.evaluate_items(False, bon.candidate(c), step=0).reward for c in range(3)])
    torch.testing.assert_close(ev.reward, losses.min(0).values, rtol=1e-5, atol=1e-6)
    winners = losses.argmin(0)
    for j in range(len(fk.local_items)):
        assert torch.equal(start[j], bon.candidate(int(winners[j]))[j, 0])


def _trainer(steps: int, root, callbacks=()):
    import lightning

    from callbacks import ComputeMeter, RenormalizeLatents

    return lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, default_root_dir=str(root),
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=[RenormalizeLatents(), ComputeMeter(), *callbacks],
                             enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks))


def test_fk_steering_runs_resume_and_count_compute(tiny_pipeline_dir, tmp_path):
    """Two runs kept by the best final particle; the same config twice gives the same latents bit for bit; an
    item's result does not depend on the items beside it (micro-batches of one); a run stopped after one FK run
    and resumed ends bit-identical; the compute meter counts particles x steps UNet evaluations per run and
    particles guidance evaluations per resampling step and at each run's end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = _fk(tiny_pipeline_dir, runs=2, seeds=[3, 4])
    t = _trainer(2, tmp_path / "full")
    t.fit(full)
    again = _fk(tiny_pipeline_dir, runs=2, seeds=[3, 4])
    _trainer(2, tmp_path / "again").fit(again)
    assert torch.equal(full.kept, again.kept) and torch.equal(full.best_loss, again.best_loss)
    alone = _fk(tiny_pipeline_dir, runs=2, seeds=[3, 4], micro_batch=1)
    _trainer(2, tmp_path / "alone").fit(alone)
    torch.testing.assert_close(alone.kept, full.kept, rtol=1e-4, atol=1e-5)
    meter = next(c for c in t.callbacks if type(c).__name__ == "ComputeMeter").last
    at = len(full.at)
    assert meter["unet_evaluations_per_image"] == 2 * 3 * 4 and meter["unet_backprop_per_image"] == 0
    assert at == 4 and meter["guidance_evaluations_per_image"] == 2 * 3 * (at + 1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1, save_top_k=0)
    part = _fk(tiny_pipeline_dir, runs=2, seeds=[3, 4])
    _trainer(2, tmp_path / "part", [ckpt, StopAfter(1)]).fit(part)
    assert part.global_step == 1
    resumed = _fk(tiny_pipeline_dir, runs=2, seeds=[3, 4])
    _trainer(2, tmp_path / "part").fit(resumed, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert torch.equal(resumed.kept, full.kept) and torch.equal(resumed.latents, full.latents)
    torch.testing.assert_close(resumed.final_evaluation().total, full.final_evaluation().total, rtol=0, atol=0)


def test_fk_steering_refuses_bad_settings(tiny_pipeline_dir):
    from doodl_lightning.fk_steering import FKSteering

    for kw, msg in ((dict(particles=0), "particles must be"), (dict(potential="sum"), "unknown potential"),
                    (dict(eta=2.0), "eta must be in"), (dict(lmbda=-1.0), "lmbda must be"),
                    (dict(sampler="edict"), "set model.sampler: ddim"), (dict(runs=0), "runs must be")):
        with pytest.raises(ValueError, match=msg):
            FKSteering(prompts=["a"], guidance=[torch.nn.Identity()], **kw)
