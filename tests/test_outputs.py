"""What a researcher sees: the console of ``cli.py fit``, TensorBoard, the contact sheet and images,
and what results.jsonl records about where it ran. One real ``cli.py fit`` in a subprocess (what a user runs:
its stdout and stderr are the console) on the tiny pipeline; the tests read its outputs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SEEDS, STEPS = ["a red circle", "a blue square"], [0, 1], 3
NAMES = [f"{p} | seed {s}" for p in PROMPTS for s in SEEDS]  # item order: every prompt with every seed

# every line the console may show; anything else is a notice that does not concern the user
BAR = re.compile(r"^step \d+/3 \|.*\| +(\?|[\d.]+)s/step, ETA [\d:?]+, elapsed [\d:]+(, .*)?$")
ALLOWED = [BAR, re.compile(r"^`Trainer\.fit` stopped: `max_steps=3` reached\.$"), re.compile(r"^DOODL finished:$"),
           re.compile(r"^  item +\d+  seed .* -> best .*"), re.compile(r"^(results|contact sheet|tensorboard): +\S")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_pipeline_dir, tiny_clip, write_config):
    """``cli.py fit`` with the progress bar on: 2 prompts x 2 seeds, 3 steps, CLIP text toward "a green star" plus
    symmetry at weight 0.5. Returns (console lines, run directory, results.jsonl records)."""
    tmp = tmp_path_factory.mktemp("seen")
    guidance = [{"class_path": "doodl_lightning.guidance.CLIPTextGuidance",
                 "init_args": {"model_config": str(tiny_clip.config), "pretrained": str(tiny_clip.weights),
                               "prompt": "a green star", "num_cuts": 2}},
                {"class_path": "doodl_lightning.guidance.SymmetryGuidance", "init_args": {"weight": 0.5}}]
    cfg = write_config(tmp / "run.yaml", tiny_pipeline_dir, tmp / "out", steps=STEPS, guidance=guidance,
                       prompts=PROMPTS, seeds=SEEDS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's own warning filters, as a user has
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "cli.py", "fit", "--config", cfg, "--trainer.enable_progress_bar", "true"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tqdm redraws its line with carriage returns: each redraw is a line the user saw
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]", proc.stdout + proc.stderr) if ln.strip()]
    run_dir = tmp / "out/lightning_logs/version_0"
    records = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    return lines, run_dir, records


@pytest.fixture(scope="module")
def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run[1]), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()


def test_console_shows_step_of_total_rate_eta_losses_and_nothing_irrelevant(run, events):
    lines, _, _ = run
    unexpected = [ln for ln in lines if not any(p.match(ln) for p in ALLOWED)]
    assert not unexpected, "lines that do not concern the user:\n" + "\n".join(unexpected)
    bars = [ln for ln in lines if BAR.match(ln)]
    for k in range(1, STEPS + 1):  # every step is counted against the total
        assert any(ln.startswith(f"step {k}/{STEPS} ") for ln in bars), k
    # the last bar names the last step's mean loss and mean best loss, as logged, and the active items
    loss = events.Scalars("train/loss")[STEPS - 1].value
    best = events.Scalars("train/best_loss")[STEPS - 1].value
    assert re.search(r"\d\.\d\ds/step, ETA 00:00, elapsed", bars[-1])
    assert bars[-1].endswith(f", loss {loss:.4f} · best {best:.4f} · active 4/4"), bars[-1]
    assert best < loss or best == pytest.approx(loss)  # each item's best so far is at most its current loss
    # the end-of-run report follows on lines of its own (the bar is closed at the last step)
    assert lines.index("DOODL finished:") > max(lines.index(b) for b in bars)


def test_tensorboard_one_chart_per_metric_with_a_named_line_per_item(events):
    from tensorboard.plugins.custom_scalar import layout_pb2

    scalars = events.Tags()["scalars"]
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert set(charts) == {"loss", "loss_clip_text", "loss_symmetry", "latent_norm", "grad_norm"}
    for metric, regexes in charts.items():
        # TensorBoard draws every tag a chart's regexes match as one line of that chart
        lines = sorted(t for t in scalars if any(re.search(r, t) for r in regexes))
        expected = [f"items/{metric}/{n}" for n in NAMES] + [f"train/{metric}"]
        assert lines == sorted(expected + (["train/best_loss"] if metric == "loss" else [])), metric
    assert "hp_metric" not in scalars  # Lightning's placeholder -1


def test_tensorboard_logs_the_final_evaluation_at_its_step_and_hparams_with_guidance_and_results(run, events):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, _, records = run
    for name, rec in zip(NAMES, records):
        points = events.Scalars(f"items/loss/{name}")
        # steps 0..2 are the evaluations the updates used; step 3 is the final latents' evaluation
        assert [p.step for p in points] == list(range(STEPS + 1))
        assert points[-1].value == pytest.approx(rec["final_loss"], rel=1e-6)
        assert points[0].value == pytest.approx(rec["initial_loss"], rel=1e-6)
    content = events.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    (start,) = [d.session_start_info for d in data.values() if d.HasField("session_start_info")]
    hp = {k: (v.string_value or v.number_value) for k, v in start.hparams.items()}
    assert hp["guidance/clip_text/class"] == "CLIPTextGuidance" and hp["guidance/clip_text/target"] == 'text "a green star"'
    assert hp["guidance/symmetry/weight"] == 0.5 and hp["guidance/clip_text/weight"] == 1.0
    (experiment,) = [d.experiment for d in data.values() if d.HasField("experiment")]
    assert {m.name.tag for m in experiment.metric_infos} == {"result/mean_best_loss", "result/mean_final_loss"}
    best, final = events.Scalars("result/mean_best_loss"), events.Scalars("result/mean_final_loss")
    assert [p.step for p in best + final] == [STEPS, STEPS]
    assert best[0].value == pytest.approx(sum(r["best_loss"] for r in records) / 4, rel=1e-6)
    assert final[0].value == pytest.approx(sum(r["final_loss"] for r in records) / 4, rel=1e-6)


def test_images_upscaled_captioned_and_one_series_per_item(run, events):
    _, run_dir, _ = run
    native = Image.open(run_dir / "images/item000/step0000.png")
    assert native.width < 128  # the tiny pipeline's images are small: what the upscaled views are for
    up = Image.open(run_dir / "images/item000/upscaled/step0000.png")
    k = up.width // native.width
    assert up.height == native.height * k and min(up.size) >= 128 > min(up.size) - min(native.size)
    # nearest-neighbour: each native pixel is a k x k block of the view
    assert np.array_equal(np.asarray(up.resize(native.size, Image.NEAREST)), np.asarray(native.convert("RGB")))
    tags = events.Tags()["images"]
    for name in NAMES:  # a series per item, so the step slider runs through one item's images
        series = events.Images(f"images/{name}")
        assert [e.step for e in series] == [0, 2, 3]
        assert series[0].width == up.width and series[0].height > up.height  # the caption strip below the image
    grid = events.Images("images/all_items")[-1]
    assert grid.width >= 4 * up.width and grid.height > up.height
    assert set(tags) == {"images/all_items", *(f"images/{n}" for n in NAMES)}


def find(sheet: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    """Every (x, y) where ``image`` is pasted, pixel for pixel, in ``sheet`` (both (H, W, 3) uint8)."""
    h, w = image.shape[:2]
    ys, xs = np.nonzero(np.all(sheet[: sheet.shape[0] - h + 1, : sheet.shape[1] - w + 1] == image[0, 0], axis=-1))
    return [(int(x), int(y)) for y, x in zip(ys, xs) if np.array_equal(sheet[y:y + h, x:x + w], image)]


def test_contact_sheet_has_titled_labelled_columns_gutters_and_losses(run):
    """The layout is checked where it shows: each cell holds its step's upscaled image, columns in step order
    with gutters between, and text (dark pixels) in the title, above each column and under each cell."""
    _, run_dir, _ = run
    sheet = np.asarray(Image.open(run_dir / "contact_sheet.png").convert("RGB"))
    steps = [0, 2, 3]
    where = {}
    for index in range(4):
        for step in steps:
            view = np.asarray(Image.open(run_dir / f"images/item{index:03d}/upscaled/step{step:04d}.png").convert("RGB"))
            found = find(sheet, view)
            assert found, (index, step)
            where[index, step] = found[0]
    h, w = view.shape[:2]
    xs = [where[0, s][0] for s in steps]
    ys = [where[i, 0][1] for i in range(4)]
    assert all(where[i, s] == (xs[c], ys[i]) for i in range(4) for c, s in enumerate(steps))  # a grid
    gaps = {b - a - w for a, b in zip(xs, xs[1:])}
    assert len(gaps) == 1 and gaps.pop() > 0  # columns in step order, one gutter apart
    assert ys == sorted(ys) and min(b - a for a, b in zip(ys, ys[1:])) > h + 10  # room for the losses

    def dark(x0, y0, x1, y1) -> bool:
        # ink on the white (765) background: the grey loss labels are antialiased, and the darkest pixel of thin
        # digits ("1.5737") sits at 306, so "dark" is a margin below white, not near black
        return bool((sheet[y0:y1, x0:x1].astype(int).sum(-1) < 450).any())

    assert dark(0, 0, sheet.shape[1], ys[0] - 18), "no title"
    for x in xs:
        assert dark(x, ys[0] - 18, x + w, ys[0]), "a column without its step label"
        for y in ys:
            assert dark(x, y + h, x + w, y + h + 15), "a cell without its loss"
            assert not dark(x + w, y, x + w + 1, y + h)  # the gutter right of each cell: no image there
    assert dark(0, ys[0], xs[0], ys[0] + h), "no prompt | seed label left of the row"


def test_contact_sheet_title_names_the_guidance_and_the_best_loss_is_green(tmp_path):
    from callbacks.image_logger import BEST, ImageLogger
    from doodl_lightning.console import guidance_title
    from doodl_lightning.data import Item
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.io import save_png

    assert guidance_title([SymmetryGuidance(weight=0.5)]) == "symmetry ×0.5"
    logger = ImageLogger(every_n_steps=1)
    logger.dir = tmp_path
    colours = {0: -0.8, 1: 0.0, 2: 0.8}  # a flat grey per step: its columns are found by colour
    for step, loss in ((0, 0.9), (1, 0.4), (2, 0.7)):
        save_png(logger._path(0, step), torch.full((3, 16, 16), colours[step]))
        logger.logged_steps.append(step)
        logger.losses[step] = {0: loss}
    logger.final_step = 2
    sheet = np.asarray(Image.open(logger.contact_sheet([Item(0, "a red circle", 0)], title="t")).convert("RGB"))
    grey = round((colours[1] + 1) * 127.5)
    middle = np.nonzero(np.all(sheet == grey, axis=-1))[1]  # the x-span of step 1's column
    rgb = sheet.astype(int)
    # text is anti-aliased: green ink is where green clearly leads red and blue (the greys never do)
    green = np.nonzero((rgb[..., 1] - rgb[..., 0] > 40) & (rgb[..., 1] - rgb[..., 2] > 40))[1]
    assert BEST[1] > BEST[0] + 40 and BEST[1] > BEST[2] + 40
    # the lowest loss (step 1) is the one number in green
    assert len(green) and middle.min() <= green.min() and green.max() <= middle.max()
    # a checkpoint written before losses were kept still loads (those cells go without a number)
    old = ImageLogger()
    old.load_state_dict({"logged_steps": [0, 2]})
    assert old.logged_steps == [0, 2] and old.losses == {}


def test_results_record_threads_device_and_versions(run):
    import diffusers
    import lightning

    _, _, records = run
    for rec in records:
        env = rec["environment"]
        assert env["torch_threads"] == 1  # OMP_NUM_THREADS=1: CPU trajectories depend on it
        assert env["device"] == "cpu" and env["precision"] == "32-true"
        assert (env["torch"], env["diffusers"], env["lightning"]) == (torch.__version__, diffusers.__version__,
                                                                      lightning.__version__)


def test_item_names_are_prompt_and_seed_unique_and_short():
    from doodl_lightning.console import item_labels
    from doodl_lightning.data import Item

    long = "a " + "very " * 30 + "long prompt"
    items = [Item(0, "a red\ncircle", 3), Item(1, "a red circle", 3), Item(2, long, 0), Item(3, "a cat", 7)]
    names = item_labels(items)
    # the same prompt and seed twice would merge two lines in TensorBoard: the index tells them apart
    assert names[0] == "a red circle | seed 3 #0" and names[1] == "a red circle | seed 3 #1"
    assert names[2].endswith("… | seed 0") and len(names[2]) < 75
    assert names[3] == "a cat | seed 7"


def test_default_progress_bar_replaces_only_lightnings_own_bar():
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from callbacks import DefaultProgressBar, StepProgressBar

    def setup(callbacks):
        trainer = SimpleNamespace(callbacks=callbacks, is_global_zero=True)
        next(cb for cb in callbacks if isinstance(cb, DefaultProgressBar)).setup(trainer, None, "fit")
        return callbacks

    # Lightning appends its default bar after the callbacks a config lists (this one included)
    assert isinstance(setup([DefaultProgressBar(), RichProgressBar()])[1], StepProgressBar)
    assert isinstance(setup([DefaultProgressBar(), TQDMProgressBar()])[1], StepProgressBar)
    chosen = TQDMProgressBar(refresh_rate=5)  # a bar the config names comes first: it stays
    assert setup([chosen, DefaultProgressBar()])[0] is chosen
    assert len(setup([DefaultProgressBar()])) == 1  # enable_progress_bar: false -> still no bar


def test_resumed_fit_keeps_each_items_best_loss_for_tensorboard(tmp_path, tiny_pipeline_dir, write_config):
    """``train/best_loss`` and HPARAMS' ``result/mean_best_loss`` cover the steps before a resume (the per-item best
    is checkpointed), so they agree with results.jsonl, whose bests span the whole trajectory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cli import main

    out = tmp_path / "out"
    # a large perturbation: losses go up and down, so some item's best comes before the resume
    cfg = lambda steps: write_config(tmp_path / f"{steps}.yaml", tiny_pipeline_dir, out, steps=steps,  # noqa: E731
                                     perturb_grad_scale=0.3)
    main(["fit", "--config", cfg(2)])
    main(["fit", "--config", cfg(4), "--ckpt_path", str(out / "lightning_logs/version_0/checkpoints/last.ckpt")])
    resumed = out / "lightning_logs/version_1"
    records = [json.loads(x) for x in (resumed / "results.jsonl").read_text().splitlines()]
    assert any(r["best_step"] < 2 for r in records), "no best before the resume: the test would prove nothing"
    acc = EventAccumulator(str(resumed), size_guidance={"scalars": 0}).Reload()
    (best,) = acc.Scalars("result/mean_best_loss")
    assert best.step == 4
    assert best.value == pytest.approx(sum(r["best_loss"] for r in records) / len(records), rel=1e-6)
