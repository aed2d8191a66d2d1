"""conf/loss: family files, recipe.yaml and the generated paper recipe files, loaded as Hydra would."""

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.formulations import FAMILIES, RECIPES, family_params, from_config, get_recipe

ROOT = Path(__file__).resolve().parents[1]
LOSS_DIR = ROOT / "conf" / "loss"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_loss_configs", ROOT / "scripts" / "gen_loss_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_file_per_family_with_build_keywords():
    files = {p.stem for p in LOSS_DIR.glob("*.yaml")} - {"recipe"}
    assert files == set(FAMILIES)
    for family in FAMILIES:
        cfg = OmegaConf.load(LOSS_DIR / f"{family}.yaml")
        assert cfg.family == family
        assert list(cfg.keys()) == ["family", *family_params(family)]
        assert from_config(cfg).family == family


@pytest.mark.parametrize(
    "family, name",
    [("rf_lognorm", "rf/lognorm(0.00, 1.00)"), ("rf_mode", "rf/mode(1.29)"), ("edm", "edm(-1.20, 1.20)")],
)
def test_family_defaults_are_the_papers_preferred(family, name):
    f = from_config(OmegaConf.load(LOSS_DIR / f"{family}.yaml"))
    assert f.name == name and f.params() == get_recipe(name).params()


def test_family_file_with_command_line_overrides():
    cfg = OmegaConf.merge(OmegaConf.load(LOSS_DIR / "rf_lognorm.yaml"), OmegaConf.from_dotlist(["m=0.5", "s=0.6"]))
    assert from_config(cfg).name == "rf/lognorm(0.50, 0.60)"


def test_recipe_file_selects_by_paper_name():
    cfg = OmegaConf.load(LOSS_DIR / "recipe.yaml")
    assert OmegaConf.is_missing(cfg, "recipe")
    cfg.recipe = "edm(0.00, 0.60)"
    assert from_config(cfg).name == "edm(0.00, 0.60)"


def test_paper_files_are_in_sync_with_recipes():
    gen = load_generator()
    assert gen.out_of_sync() == []
    files = sorted((LOSS_DIR / "paper").glob("*.yaml"))
    assert len(files) == 61
    names = []
    for path in files:
        f = from_config(OmegaConf.load(path))
        assert f.slug == path.stem
        names.append(f.name)
    assert sorted(names) == sorted(RECIPES)


def test_sync_check_detects_edited_missing_and_stale_files(tmp_path):
    gen = load_generator()
    gen.write(tmp_path)
    assert gen.out_of_sync(tmp_path) == []
    (tmp_path / "rf.yaml").unlink()
    (tmp_path / "edm_0.00_0.60.yaml").write_text("family: edm\np_mean: 0.0\np_std: 0.7\n")
    (tmp_path / "rf_mode_0.00.yaml").write_text("family: rf_mode\ns: 0.0\n")
    assert gen.out_of_sync(tmp_path) == ["rf_mode_0.00.yaml", "edm_0.00_0.60.yaml", "rf.yaml"]
    assert gen.sweep_list().split(",")[:2] == ["paper/eps_linear", "paper/v_linear"]


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["+loss=rf_lognorm", "loss.m=0.5", "loss.s=0.6"], "rf/lognorm(0.50, 0.60)"),
        (["+loss=paper/edm_-1.20_1.20"], "edm(-1.20, 1.20)"),
        (["+loss=recipe", "loss.recipe='rf/lognorm(0.50, 0.60)'"], "rf/lognorm(0.50, 0.60)"),
    ],
)
def test_hydra_composes_the_loss_group(overrides, name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=None, overrides=overrides)
    assert from_config(cfg.loss).name == name
