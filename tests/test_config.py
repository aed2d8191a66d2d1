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


def shards_cfg(train, eval_):
    """The configuration of a run on these shard folders, its data resolved (as a job fingerprints it)."""
    from src.training.prepare import resolve_data

    cfg = compose_cfg(["data=shards", f"data.train_dir={train}", f"data.eval_dir={eval_}", "data.val_samples=4"])
    resolve_data(cfg)
    return cfg


def trained_on_shards(tmp_path) -> tuple[Path, dict]:
    """Shard folders a/train and a/eval, and a run directory bound to a run on them: (run, its fingerprint)."""
    import json

    from tests.test_expectations import small_folder
    from src.training.prepare import _fingerprint_json

    small_folder(tmp_path / "a/train", 0)
    small_folder(tmp_path / "a/eval", 1)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")  # something trained: the directory is bound
    stored = _fingerprint_json(shards_cfg(tmp_path / "a/train", tmp_path / "a/eval"))
    (run / "fingerprint.json").write_text(json.dumps(stored))
    return run, stored


def test_shard_folders_are_named_by_their_content_so_moved_data_resumes(tmp_path):
    """A run on shards records its folders by a digest of their meta.json: moved they are the same data under a new
    path; written again at the same path they are other data; a run recorded with paths (before) compares as before,
    through the folder where it still is."""
    import json
    import shutil

    from tests.test_expectations import small_folder
    from src.config import SHARD_ID_PREFIX
    from src.training.prepare import fingerprint_changes

    cfg_at = shards_cfg
    run, stored = trained_on_shards(tmp_path)
    assert stored["data"]["train_dir"].startswith(SHARD_ID_PREFIX) and stored["data"]["train_dir"] != \
        stored["data"]["eval_dir"]

    shutil.move(tmp_path / "a", tmp_path / "b")  # moved: the same folders
    assert fingerprint_changes(cfg_at(tmp_path / "b/train", tmp_path / "b/eval"), run) == []
    small_folder(tmp_path / "c/train", 2)  # another folder: other data
    assert fingerprint_changes(cfg_at(tmp_path / "c/train", tmp_path / "b/eval"), run) == ["data.train_dir"]
    shutil.rmtree(tmp_path / "b/eval")
    small_folder(tmp_path / "b/eval", 3)  # written again in place: other data, at the path trained with
    assert fingerprint_changes(cfg_at(tmp_path / "b/train", tmp_path / "b/eval"), run) == ["data.eval_dir"]

    # Recorded with paths (before folders were named by content): the same folders where they still are, or a copy.
    old = {**stored, "data": {**stored["data"], "train_dir": str(tmp_path / "b/train"),
                              "eval_dir": str(tmp_path / "b/eval")}}
    (run / "fingerprint.json").write_text(json.dumps(old))
    shutil.copytree(tmp_path / "b", tmp_path / "copy")
    assert fingerprint_changes(cfg_at(tmp_path / "copy/train", tmp_path / "copy/eval"), run) == []
    shutil.rmtree(tmp_path / "b")  # gone: known by its path only, as before
    assert fingerprint_changes(cfg_at(tmp_path / "copy/train", tmp_path / "copy/eval"), run) == \
        ["data.eval_dir", "data.train_dir"]


def test_re_evaluating_a_run_whose_shards_moved_takes_their_new_folders_and_no_others(tmp_path):
    """python -m src.evaluate RUN_DIR data.train_dir=NEW data.eval_dir=NEW: the run's config.yaml names where the
    folders were; the same folders (by content) are taken, other data is refused in one line."""
    import shutil

    from tests.test_expectations import small_folder
    from src.config import ConfigError
    from src.evaluate import _check_moved_data, _check_override

    cfg_at = shards_cfg
    run, _ = trained_on_shards(tmp_path)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = [f"data.train_dir={tmp_path / 'b/train'}", f"data.eval_dir={tmp_path / 'b/eval'}"]
    assert [_check_override(o) for o in moved] == moved
    _check_moved_data(cfg_at(tmp_path / "b/train", tmp_path / "b/eval"), run, moved)  # the same folders: taken
    small_folder(tmp_path / "other", 2)
    with pytest.raises(ConfigError, match=rf"^data.train_dir={tmp_path}/other: not the data {run} was trained with "
                                          r"\(its fingerprint.json, .* records another data.train_dir\); give"):
        _check_moved_data(cfg_at(tmp_path / "other", tmp_path / "b/eval"), run, [f"data.train_dir={tmp_path}/other"])
    with pytest.raises(ConfigError, match=r"^data.name: only eval.\*, sampler.\* and paths.\* may change"):
        _check_override("data.name=cc12m")
    # A run on the embedded data: they are built again under paths.cache_dir, and the setting was silently ignored.
    from omegaconf import OmegaConf

    embedded = OmegaConf.create({"data": {"kind": "embedded", "name": "digits", "train_dir": "/cache/digits/train"}})
    with pytest.raises(ConfigError, match=rf"^data.train_dir=/x: {run} was trained on the embedded digits data, which "
                                          "are built under paths.cache_dir"):
        _check_moved_data(embedded, run, ["data.train_dir=/x"])
