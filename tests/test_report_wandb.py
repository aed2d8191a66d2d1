"""Publishing the rank report to W&B offline: run files written under WANDB_DIR, mode resolution."""
from pathlib import Path

import pytest

from src.ranking.publish import wandb_mode
from src.ranking.report import main
from src.ranking.synthetic import write_synthetic_sweep


def test_mode_defaults_to_offline_and_respects_env_and_user_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / "settings").write_text("[default]\nmode = online\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # W&B reads WANDB_MODE itself


def test_offline_publish_writes_run_files(tmp_path, monkeypatch, capsys):
    """`python -m src.ranking.report SWEEP --wandb` with no W&B settings at all: offline run files, no credential."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the project's default decides: offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0), (25, 5.0)])
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "report"), "--wandb"]) == 0
    run_dir = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("W&B run files: ")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and Path(run_dir).parent == runs[0]
    assert list(runs[0].glob("run-*.wandb")), "offline run data file missing"
    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    tables = sorted(p.name.split("_0_")[0] for p in (runs[0] / "files" / "media" / "table").glob("*.table.json"))
    assert len(images) == 3 and tables == ["average_rank_table", "rank_table"]
    assert not any("api_key" in p.read_text(errors="ignore") for p in runs[0].rglob("*.yaml"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"local-" + b"0" * 40 in p.read_bytes()]
    import wandb

    assert wandb.run is None  # finished, so a later job does not log into this run


def test_disabled_wandb_publishes_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    """WANDB_MODE=disabled: the report is written, no W&B files, and no path to files that do not exist."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)])
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "report"), "--wandb"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "W&B is disabled (WANDB_MODE=disabled or the mode in W&B's settings): nothing published")
    assert (tmp_path / "report" / "report.md").is_file()
    assert not [p for p in (tmp_path / "wandb_dir").rglob("*") if p.is_file()]  # W&B makes the folder, writes nothing


@pytest.fixture(autouse=True)
def _no_leftover_run():
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def test_publish_goes_to_the_project_and_entity_the_runs_logged_to(tmp_path, monkeypatch):
    """A sweep trained with logger.wandb.project=P: the report's run joins the sweep's group in P, not the default."""
    import wandb
    import yaml

    from src.ranking.publish import publish_wandb
    from src.ranking.report import build_report

    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)])
    for config in sweep.glob("*/.hydra/config.yaml"):
        cfg = yaml.safe_load(config.read_text()) or {}
        cfg["logger"] = {"csv": True, "wandb": {"enabled": True, "mode": "offline", "project": "my-proj",
                                                "entity": "my-team"}}
        config.write_text(yaml.safe_dump(cfg))
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")
    with pytest.raises(RuntimeError, match="stop"):
        publish_wandb(build_report([sweep], draws=0), {})
    assert (seen["project"], seen["entity"], seen["group"]) == ("my-proj", "my-team", "sweep")
