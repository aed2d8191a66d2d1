"""The configuration tree composes for every option, through Hydra's compose API (as `import src.run` does)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from src.config import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
register_resolvers()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def test_default_composes():
    cfg = compose_cfg()
    assert cfg.data.name == "digits"
    assert cfg.loss.family == "rf_lognorm"
    assert OmegaConf.select(cfg, "model._target_").startswith("src.models")


@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_option_composes(loss):
    overrides = [f"loss={loss}"]
    if loss == "recipe":
        overrides.append("loss.recipe='rf/lognorm(0.50, 0.60)'")
    cfg = compose_cfg(overrides)
    from src.formulations import from_config

    f = from_config(OmegaConf.to_container(cfg.loss, resolve=True))
    assert cfg.run_name == f"digits/{f.slug}"


def test_paper_recipes_compose():
    from src.formulations import RECIPES, get_recipe

    names = {get_recipe(n).slug for n in RECIPES}
    files = {p.stem for p in (CONF / "loss" / "paper").glob("*.yaml")}
    assert files == names
    cfg = compose_cfg(["loss=paper/edm_-1.20_1.20"])
    assert cfg.run_name == "digits/edm_-1.20_1.20"


@pytest.mark.parametrize("model", options("model"))
def test_every_model_option_composes(model):
    cfg = compose_cfg([f"model={model}"])
    assert "_target_" in cfg.model


@pytest.mark.parametrize("data", options("data"))
def test_every_data_option_composes(data):
    cfg = compose_cfg([f"data={data}"])
    assert cfg.data.kind in ("embedded", "shards")


def test_family_parameters_override():
    cfg = compose_cfg(["loss=rf_lognorm", "loss.m=0.5", "loss.s=0.6"])
    assert cfg.run_name == "digits/rf_lognorm_0.50_0.60"


def test_loading_mode_and_workers_do_not_change_the_fingerprint():
    """Streaming and in-memory loading give the same batches: switching between them resumes the same run."""
    from src.config import fingerprint

    base = fingerprint(compose_cfg(["data.in_memory=true", "data.num_workers=0"]))
    assert fingerprint(compose_cfg(["data.in_memory=false", "data.num_workers=2"])) == base
    assert fingerprint(compose_cfg(["data.batch_size=32"])) != base


def test_a_paper_recipe_by_name_is_the_run_of_its_family_and_parameters(tmp_path):
    """loss=recipe loss.recipe='rf/lognorm(0.50, 0.60)' and loss=rf_lognorm loss.m=0.5 loss.s=0.6 name one model and
    one run directory: either resumes (or skips) the other's run, in both directions; another recipe is refused."""
    import json

    from src.training.prepare import _fingerprint_json, fingerprint_changes

    by_name = compose_cfg(["loss=recipe", "loss.recipe='rf/lognorm(0.50, 0.60)'"])
    by_family = compose_cfg(["loss=rf_lognorm", "loss.m=0.5", "loss.s=0.6"])
    assert by_name.run_name == by_family.run_name == "digits/rf_lognorm_0.50_0.60"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")  # something trained: the directory is bound
    for trained, relaunched in ((by_family, by_name), (by_name, by_family)):
        (tmp_path / "fingerprint.json").write_text(json.dumps(_fingerprint_json(trained)))
        assert fingerprint_changes(relaunched, tmp_path) == []
    other = compose_cfg(["loss=recipe", "loss.recipe='rf/lognorm(0.50, 1.00)'"])
    assert fingerprint_changes(other, tmp_path) == ["loss.s"]
