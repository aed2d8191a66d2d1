"""W&B's git record without credentials in the remote URL (docs/pitfalls.md, "Credentials in a git remote URL").

wandb.init records the repository's remote URL (`remote.origin.url`) in the run (the .wandb file offline, the run's
metadata once synced). W&B removes the password from it but keeps the user name: a token given as the user name
(`https://<token>:x-oauth-basic@github.com/...`, GitHub's form for a token) was written to disk as it was.
"""
from __future__ import annotations

import os
import subprocess
from urllib.parse import urlsplit, urlunsplit


def strip_credentials(url: str) -> str:
    """The URL without its user name and password (`https://host/path`); other forms (scp-like ssh) unchanged."""
    parts = urlsplit(url)
    if parts.hostname is None or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _git(*args: str, cwd: str | None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def wandb_git_settings() -> dict:
    """wandb.Settings keys that give W&B the remote URL without credentials (and the commit, which W&B then no
    longer looks up), where the remote W&B would read has any; {} otherwise, so that W&B's own record is unchanged
    (a user's WANDB_GIT_REMOTE_URL or WANDB_DISABLE_GIT included)."""
    if os.environ.get("WANDB_GIT_REMOTE_URL") or os.environ.get("WANDB_DISABLE_GIT", "").lower() in ("true", "1"):
        return {}
    cwd = os.environ.get("WANDB_GIT_ROOT") or None
    remote = os.environ.get("WANDB_GIT_REMOTE") or "origin"
    url = _git("config", "--get", f"remote.{remote}.url", cwd=cwd)
    if url is None or strip_credentials(url) == url:
        return {}
    settings = {"git_remote_url": strip_credentials(url)}
    commit = os.environ.get("WANDB_GIT_COMMIT") or _git("rev-parse", "HEAD", cwd=cwd)
    if commit:
        settings["git_commit"] = commit
    return settings
