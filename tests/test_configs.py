"""Every shipped YAML parses against the code's signatures (litgpt's test_config_hub style)."""
from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from cli import TRAINER_DEFAULTS, DOODLCLI
from doodl_lightning.search import NoiseSearch

ROOT = Path(__file__).resolve().parents[1]
# training configs (cli.py fit); eval_*.yaml are model_eval.py's (tests/test_noise_search_eval.py parses them)
CONFIGS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                 if "shapes" not in p.relative_to(ROOT / "experiments").parts[:1] and not p.name.startswith("eval_"))


class ParseOnly(LightningCLI):
    """Parse and type-check (class paths resolve, init args match signatures), instantiate nothing; ``model:``
    without a class_path is cli.py's default method, as in a run."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": DOODLCLI.DEFAULT_METHOD}})

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_parses(path):
    cli = ParseOnly(NoiseSearch, subclass_mode_model=True, run=False, args=["--config", str(path)],
                    trainer_defaults=TRAINER_DEFAULTS)  # as cli.py: DOODL, or another search by class_path
    model = cli.config["model"]["init_args"]
    assert model["guidance"], "every experiment has at least one guidance module"
    for g in model["guidance"]:
        assert g["class_path"].startswith("doodl_lightning.guidance.")


def test_there_are_configs_for_every_guidance_kind():
    text = "".join(p.read_text() for p in CONFIGS)
    for kind in ("CLIPTextGuidance", "CLIPImageGuidance", "AestheticGuidance", "ClassifierGuidance", "SymmetryGuidance"):
        assert kind in text
    assert "sampler: ddim" in text and "sampler: edict" in text and "seed_parallel" in text
