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


def test_unreadable_wandb_settings_mean_offline(tmp_path, monkeypatch):
    """A settings file W&B's parser rejects must not send the report online: the project's default (offline) holds."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    (tmp_path / "settings").write_text("mode = online\n")  # no [default] section header
    assert wandb_mode() == "offline"


def _write_logger(path, wandb_cfg):
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"logger": {"csv": True, "wandb": wandb_cfg}}))


def test_runs_wandb_target_follows_each_runs_latest_launch_and_skips_runs_without_wandb(tmp_path):
    """A run relaunched with W&B off does not send the report to the project its first launch (config.yaml) used;
    the next run that did log to W&B decides."""
    from src.ranking.publish import runs_wandb_target

    off, on = tmp_path / "off", tmp_path / "on"
    _write_logger(off / ".hydra" / "config.yaml", {"enabled": False, "project": "latest-off"})
    _write_logger(off / "config.yaml", {"enabled": True, "project": "stale", "entity": "old-team"})
    _write_logger(on / "config.yaml", {"enabled": True, "project": "p", "entity": "e"})
    assert runs_wandb_target([off]) == (None, None)
    assert runs_wandb_target([off, on]) == ("p", "e")


def test_publish_logs_samples_and_figures_apart_and_summarises_the_best_recipe(tmp_path, monkeypatch):
    """What lands in the W&B run: sample sheets under samples/, other figures under figures/, the HTML report only
    when its file exists, finite Spearman correlations only, and the best recipe with its average ranks."""
    import math

    import wandb

    from src.ranking.publish import publish_wandb
    from src.ranking.report import build_report

    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos", "edm/rf"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)])
    report = build_report([sweep], draws=0)

    class Run:
        disabled, dir, summary, logged = False, str(tmp_path / "files"), {}, {}

        def log(self, data):
            self.logged.update(data)

    run = Run()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    monkeypatch.setattr(wandb, "finish", lambda: None)
    monkeypatch.setattr(wandb, "Table", lambda **kwargs: kwargs)
    monkeypatch.setattr(wandb, "Image", lambda path: path)
    paths = {"samples_digits": tmp_path / "samples_digits.png", "steps_cfg_digits": tmp_path / "s.png",
             "ranks": tmp_path / "ranks.png", "report_md": tmp_path / "report.md",
             "report_html": tmp_path / "absent.html"}
    assert publish_wandb(report, paths, project="p") == run.dir
    assert sorted(k for k in run.logged if "/" in k) == ["figures/ranks", "samples/samples_digits",
                                                         "samples/steps_cfg_digits"]
    assert "report" not in run.logged  # the HTML report was not written: nothing to attach
    finite = {r.column for r in report.spearman.itertuples() if math.isfinite(r.spearman)}
    assert finite and finite != set(report.spearman["column"])
    assert {k.split("/", 1)[1] for k in run.summary if k.startswith("spearman_vs_paper/")} == finite
    best = report.table["all"].idxmin()
    assert run.summary["best_recipe"] == best and run.summary["partial_sweep"] is report.sweep.partial
    assert run.summary["best_average_rank/all"] == report.table.loc[best, "all"]


def test_a_restricted_report_is_published_under_its_own_name(tmp_path, monkeypatch):
    """--recipes ranks some recipes among themselves: its W&B run must not carry the full ranking's name (its
    best_recipe is the best of those recipes only)."""
    import wandb

    from src.ranking.report import main

    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos", "edm/rf"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)])
    seen = []

    def init(**kwargs):
        seen.append(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(wandb, "init", init)
    for extra in ([], ["--recipes", "v/cos", "edm/rf"]):
        with pytest.raises(RuntimeError, match="stop"):
            main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r"), "--wandb", *extra])
    assert [k["name"] for k in seen] == ["rank-report sweep", "rank-report sweep-recipes=edm_rf+v_cos"]  # names sorted
    assert seen[1]["config"]["report"] == "sweep-recipes=edm_rf+v_cos" and seen[1]["group"] == "sweep"


def test_a_wandb_that_cannot_start_is_one_line_and_a_failing_exit(tmp_path, monkeypatch, capsys):
    """WANDB_MODE=online without `wandb login`: W&B raises UsageError; the report (written) says so in one line and
    exits 1, not with W&B's traceback."""
    import wandb

    from src.ranking.report import main

    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)])

    def init(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init)
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r"), "--wandb"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rank report: error: --wandb: UsageError: No API key configured. Use `wandb login` to log "
                          "in. (the report in ") and err.count("\n") == 1
    assert (tmp_path / "r" / "report.html").is_file()


def test_the_report_is_published_while_its_folder_is_locked(tmp_path, monkeypatch, capsys):
    """--wandb uploaded the report's files after the report lock was released: another report of the same folder
    could replace them mid-upload."""
    import fcntl

    import src.ranking.publish as publish

    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=("rf/cosmap", "v/cos"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)])
    seen = {}

    def publish_wandb(report, paths, label=None):
        with open(tmp_path / "r" / ".report.lock", "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True
        seen["files"] = sorted(Path(p).name for p in paths.values() if Path(p).is_file())
        return str(tmp_path / "run-files")

    monkeypatch.setattr(publish, "publish_wandb", publish_wandb)
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r"), "--wandb"]) == 0
    assert seen["locked"] and "report.html" in seen["files"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"W&B run files: {tmp_path / 'run-files'}"
