"""No credential reaches the files of a W&B run (offline): a token in the git remote URL, the environment's keys."""
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.utils.wandb_git import strip_credentials

TOKEN = "sekritGITTOKEN0"  # GitHub's form for a token: the URL's user name, with x-oauth-basic as the password
SECRETS = [TOKEN, "sekritWANDB123", "sekritHF456", "sekritAWS789"]


def test_strip_credentials():
    assert strip_credentials(f"https://{TOKEN}:x-oauth-basic@github.com/x/y.git") == "https://github.com/x/y.git"
    assert strip_credentials(f"https://{TOKEN}@github.com:8443/x/y.git") == "https://github.com:8443/x/y.git"
    assert strip_credentials("https://github.com/x/y.git") == "https://github.com/x/y.git"
    assert strip_credentials("git@github.com:x/y.git") == "git@github.com:x/y.git"


@pytest.fixture
def tokened_repo(tmp_path, monkeypatch):
    """The working directory: a git repository whose origin carries a token; W&B's keys in the environment, its
    settings and caches under tmp_path, and a fresh W&B process state (it caches its settings, the root too)."""
    import wandb

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    subprocess.run([*git, "remote", "add", "origin", f"https://{TOKEN}:x-oauth-basic@github.com/x/y.git"], check=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "home" / key.lower()))
    for key in ("WANDB_MODE", "WANDB_GIT_REMOTE_URL", "WANDB_GIT_ROOT", "WANDB_GIT_COMMIT", "WANDB_DISABLE_GIT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "sekritWANDB123" + "0" * 30)
    monkeypatch.setenv("HF_TOKEN", "sekritHF456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekritAWS789")
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def leaks(root: Path) -> list[str]:
    return [f"{p}: {s}" for p in root.rglob("*") if p.is_file() and ".git" not in p.parts
            for s in SECRETS if s.encode() in p.read_bytes()]


def run_file(root: Path) -> bytes:
    (path,) = [p for p in root.rglob("run-*.wandb") if "latest-run" not in p.parts]
    return path.read_bytes()


def test_a_training_run_records_its_git_remote_without_the_token(tokened_repo):
    import wandb

    from src.training.job import build_loggers

    cfg = OmegaConf.create({"logger": {"csv": False, "wandb": {"enabled": True, "mode": "offline",
                                                                "project": "p", "entity": None}},
                            "sweep_name": "s", "run_name": "digits/rf"})
    run_dir = tokened_repo / "run"
    (logger,) = build_loggers(cfg, run_dir)
    logger.experiment.log({"loss": 1.0})
    logger.finalize("success")
    wandb.finish()
    assert list((run_dir / "wandb").glob("offline-run-*")), "not an offline run"
    assert leaks(tokened_repo) == []
    assert b"https://github.com/x/y.git" in run_file(run_dir)  # the remote is still recorded, without the token


def test_a_published_report_records_its_git_remote_without_the_token(tokened_repo, capsys):
    from src.ranking.report import main
    from src.ranking.synthetic import write_synthetic_sweep

    sweep = write_synthetic_sweep(tokened_repo / "sweep", recipes=("rf/cosmap", "v/cos"), datasets=("digits",),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0), (25, 5.0)])
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tokened_repo / "report"), "--wandb"]) == 0
    assert "offline-run-" in capsys.readouterr().out
    assert leaks(tokened_repo) == []
    assert b"https://github.com/x/y.git" in run_file(tokened_repo / "home" / "wandb_dir")
