"""Re-evaluate a finished run: `python -m src.evaluate RUN_DIR [key=value ...]`.

    python -m src.evaluate outputs/multirun/default/digits/rf_lognorm_0.00_1.00 eval.n_samples=200
    python -m src.evaluate RUN_DIR eval.seed=7 eval.checkpoint=last eval.clip.model_name=ViT-L-14-quickgelu \\
        eval.clip.weights_path=/models/clip_l14.pt
    PYTHONPATH=docs/examples python -m src.evaluate RUN_DIR --config-dir docs/examples/conf sampler=ab2

Loads the run's own configuration (RUN_DIR/config.yaml, written by the job; .hydra/config.yaml for older runs),
merged over today's default configuration so keys added since take their defaults, applies the overrides (only
eval.*, sampler.* and paths.* may change, and data.train_dir / data.eval_dir where the run's own shard folders have
moved: anything else would describe another trained model) and evaluates
every record results.json lacks, from the run's checkpoint; never trains. Records of other settings stay in
results.json, kept apart by their settings (src/results.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, register_resolvers
from src.utils.io import refused_write

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: The configuration groups an evaluation may change; the rest belongs to the trained model (its fingerprint).
OVERRIDABLE = ("eval", "sampler", "paths")
#: Where the run's shard folders lie now, when they have moved: the same folders (by content) or a refusal.
MOVABLE = ("data.train_dir", "data.eval_dir")

USAGE = ("usage: python -m src.evaluate RUN_DIR [--config-dir DIR] "
         "[eval.KEY=VALUE | sampler=NAME | sampler.KEY=VALUE | paths.KEY=VALUE ...]")


def run_config_path(run_dir: Path) -> Path:
    """RUN_DIR/config.yaml, or Hydra's copy in older run directories; FileNotFoundError naming RUN_DIR."""
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{run_dir}: no config.yaml (nor .hydra/config.yaml): not a run directory")


def _check_override(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    if "=" not in override or not key:
        raise ConfigError(f"{override!r}: overrides are key=value")
    if key.split(".")[0] not in OVERRIDABLE and key not in MOVABLE:
        raise ConfigError(f"{key}: only eval.*, sampler.* and paths.* may change when re-evaluating a trained run, "
                          f"and {' and '.join(MOVABLE)} where the run's shard folders have moved (anything else is "
                          f"another model: train it with python -m src.run)")
    return override


_ABSENT = object()  # OmegaConf.select's default: tells a missing key from a null one


def _stored_config(path: Path) -> DictConfig:
    """The run's configuration file, or a one-line error naming it when it is damaged (a file cut short parses but
    lacks sections, which today's defaults would fill in: another model than the one trained)."""
    from src.utils.io import first_line

    try:
        stored = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 -- YAML's errors run over several lines
        raise ConfigError(f"{path}: not a readable configuration ({first_line(e)}); restore it") from e
    missing = [k for k in ("loss", "model", "data", "train") if not OmegaConf.is_dict(stored) or k not in stored]
    if missing:
        raise ConfigError(f"{path}: not a run's whole configuration (no {', '.join(missing)}); restore it")
    return stored


def _override_value(override: str):
    """The value of key=value as src.run reads it (Hydra's override grammar: eval.settings=[{steps:2,cfg:1.0}] is a
    list of one mapping there, where YAML would read the key 'steps:2'); a one-line error for what it cannot parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.utils.io import first_line

    try:
        parsed = OverridesParser.create().parse_override(override)
    except Exception as e:  # noqa: BLE001 -- Hydra's parse errors run over several lines
        raise ConfigError(f"{override}: not a valid override ({first_line(e)})") from None
    if parsed.is_sweep_override():
        raise ConfigError(f"{override}: one value per setting here (a sweep is python -m src.run -m ...)")
    return parsed.value()


def _check_shape(key: str, text: str, value, current) -> None:
    """A group of settings takes only a group, a list only a list: eval.clip=null would fail later in a traceback,
    eval.settings={steps: 2, cfg: 1} in OmegaConf's merge, neither naming the setting."""
    if OmegaConf.is_dict(current) and not isinstance(value, dict):
        first = sorted(current)[0] if len(current) else "KEY"
        raise ConfigError(f"{key}={text}: {key} is a group of settings ({', '.join(sorted(current))}); set one of "
                          f"them, e.g. {key}.{first}=VALUE")
    if OmegaConf.is_list(current) and isinstance(value, dict):
        raise ConfigError(f"{key}={text}: must be a list, in brackets ({key}='[...]')")


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = (), config_dirs: Sequence[Path] = ()
                    ) -> DictConfig:
    """The run's configuration over today's defaults, with the (evaluation) overrides applied; config_dirs are
    folders of configurations added to the search path (--config-dir: `sampler=NAME` of a folder of your own)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    run_dir = Path(run_dir)
    overrides = [_check_override(o) for o in overrides]
    group = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "sampler"]  # a config group choice
    stored = _stored_config(run_config_path(run_dir))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="evaluate"):
        searchpath = ["hydra.searchpath=[" + ",".join(f"file://{Path(d).resolve()}" for d in config_dirs) + "]"]
        defaults = compose(config_name="config", overrides=group + (searchpath if config_dirs else []))
    OmegaConf.set_struct(defaults, False)  # keys of the run's time that have gone since are kept, not refused
    cfg = OmegaConf.merge(defaults, stored)
    # A recipe or a backbone is a whole group option: the run's replaces today's default rather than merging into it
    # (edm's p_mean/p_std merged into the default rf_lognorm's m/s would be another recipe).
    for group_key in ("loss", "model"):
        if group_key in stored:
            cfg[group_key] = stored[group_key]
    try:
        cfg.run_name = str(cfg.run_name)
    except Exception:  # Hydra's ${hydra:...} in an older run's .hydra/config.yaml: no Hydra run here
        cfg.run_name = run_dir.name
    if group and "sampler" in defaults:  # the chosen sampler group replaces the run's
        cfg.sampler = defaults.sampler
    rest = [o for o in overrides if o not in group]
    values = {}
    for o in rest:  # a typo (eval.n_sample=..., or +eval.n_sample=...) would be evaluated as nothing changed
        key, text = o.lstrip("+").split("=", 1)
        current = OmegaConf.select(cfg, key, default=_ABSENT)
        if current is _ABSENT:
            section = key.split(".")[0]
            known = sorted(cfg[section]) if OmegaConf.is_dict(cfg.get(section)) else []
            raise ConfigError(f"{key}: no such setting; {section}.* has {', '.join(known)}")
        values[key] = _override_value(o.lstrip("+"))
        _check_shape(key, text, values[key], current)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg



def _check_sampler_tag(run_dir: Path, cfg: DictConfig) -> None:
    """A sweep's run directory of one sampler (run_tag sampler=rf_time) names its records' ranked entry: records of
    another sampler written there would be ranked as that sampler's ("eps/linear [sampler=rf_time]")."""
    from src.results import DEFAULT_SAMPLER, parse_run_tag

    tags = parse_run_tag(cfg.get("run_tag", ""))
    tagged = [k for k in tags if k == "sampler" or k.startswith("sampler.")]
    own = OmegaConf.select(_stored_config(run_config_path(run_dir)), "sampler.name", default=DEFAULT_SAMPLER)
    if tagged and str(cfg.sampler.name) != str(own):
        raise ConfigError(
            f"sampler.name={cfg.sampler.name}: {run_dir} is its sweep's directory of {tagged[0]}={tags[tagged[0]]} "
            f"(sampler.name={own}), whose records are ranked as that sampler's; relaunch the sweep with the sampler "
            "added (its training is reused) or evaluate a run directory without a swept sampler")


def _check_moved_data(cfg: DictConfig, run_dir: Path, overrides: Sequence[str]) -> None:
    """data.train_dir / data.eval_dir given: the folders the run was trained with, moved (its fingerprint.json names
    them by content), or a one-line refusal; another dataset would be another model's evaluation."""
    from src.training.prepare import fingerprint_changes

    given = [o.lstrip("+").split("=", 1) for o in overrides if o.lstrip("+").split("=", 1)[0] in MOVABLE]
    if given and cfg.data.kind != "shards":  # embedded data are built again where the cache is: nothing to move
        key, value = given[0]
        raise ConfigError(f"{key}={value}: {run_dir} was trained on the embedded {cfg.data.name} data, which are "
                          "built under paths.cache_dir; only a run on shard folders takes their new place")
    changed = fingerprint_changes(cfg, run_dir) if given else []
    if changed:
        key, value = given[0]
        raise ConfigError(f"{key}={value}: not the data {run_dir} was trained with (its fingerprint.json, which names "
                          f"each shard folder by its meta.json, records another {' and '.join(changed)}); give where "
                          "its own folders lie now")


def evaluate(run_dir: str | Path, overrides: Sequence[str] = (), config_dirs: Sequence[Path] = ()
             ) -> list[dict]:
    """Evaluate what the run lacks under these settings; returns the run's current records."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    for o in overrides:  # before anything heavy is imported
        _check_override(o)
    run_config_path(run_dir)  # a sweep's folder or any other is not a run directory, not an untrained run
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint (last.ckpt) to evaluate; train the run first")
    cfg = load_run_config(run_dir, overrides, config_dirs)
    _check_sampler_tag(run_dir, cfg)
    if not cfg.eval.enabled:
        raise ConfigError("eval.enabled=false: nothing to evaluate")

    from src.evaluation.run import checkpoint_step, describe, evaluate_run, missing_for, select_checkpoint
    from src.launch.rundir import EVAL_REQUEST
    from src.utils.io import atomic_write_bytes
    from src.training.job import training_finished
    from src.training.prepare import check_config, check_decoder, check_trained_code, resolve_data

    check_trained_code(cfg, run_dir)  # a formulation or backbone module from outside edited since the training
    check_config(cfg)  # the values, the sampler, the weight files: as src.run checks them, before any work
    from src.training.job import _torch_settings
    from src.launch.rundir import run_dir_lock, run_log
    from src.utils.io import remove_stale_temp_files
    from src.utils.progress import evaluation_hook

    meta = resolve_data(cfg)  # the settings' own checks: refused without touching the run (not even its lock file)
    _check_moved_data(cfg, run_dir, overrides)
    check_decoder(cfg, meta)
    # The run's lock, as a job holds it, before the run's state is read or said: a relaunched sweep's job (or a second
    # src.evaluate) working there is refused in one line (not "training is not finished" of a job resuming it, nor a
    # "missing: evaluating" line before the refusal), and a temp file left in the run is no live writer's, so it can go.
    with run_dir_lock(run_dir):
        if not training_finished(cfg, run_dir):  # its results would be of a model that is not the run's final one
            raise ConfigError(f"{run_dir}: training is not finished (last.ckpt is of step "
                              f"{checkpoint_step(run_dir, 'last')} of train.max_steps={cfg.train.max_steps}); rerun "
                              f"its python -m src.run command to resume it, which evaluates at the end")
        missing = missing_for(cfg, run_dir, meta=meta)
        log = logging.getLogger("src.evaluate")
        if missing:
            select_checkpoint(run_dir, str(cfg.eval.checkpoint))  # a lost best.ckpt is named before "evaluating"
            log.info("%s: results for %s missing: evaluating", run_dir, describe(cfg, run_dir, missing),
                     extra={"console": True})
        else:
            log.info("%s: results complete, nothing to do", run_dir, extra={"console": True})
        _torch_settings(cfg)  # as a job evaluates (torch_threads; TF32 matmuls on a GPU): the same record and numbers
        with run_log(run_dir):  # library chatter (open_clip's loading lines) to run.log, once nothing has refused
            for path in remove_stale_temp_files(run_dir):
                log.info("removed %s, left by an interrupted write", path)
            records = evaluate_run(cfg, run_dir, meta=meta, on_setting=evaluation_hook())
            # The run's latest request, for the rank report: these records are ranked (and the run complete with
            # them) until the next launch. Written once they all exist, so a refused, failed or interrupted command
            # leaves the one before.
            atomic_write_bytes(run_dir / EVAL_REQUEST, OmegaConf.to_yaml(cfg).encode("utf-8"))
    return records


def _config_dirs(argv: list[str]) -> tuple[list[Path], list[str]]:
    """(--config-dir folders, the other arguments); as for python -m src.run and src.plan, -cd for short."""
    dirs, rest, it = [], [], iter(argv)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{arg}: needs a folder")
        elif arg.startswith("--config-dir="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        if not Path(value).is_dir():
            raise ConfigError(f"--config-dir {value}: no such folder")
        dirs.append(Path(value))
    if not rest:
        raise ConfigError(USAGE)
    return dirs, rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return 0 if argv else 2
    from src.utils.progress import ConsoleFilter

    console = logging.StreamHandler()  # what src.run shows: errors, this project's warnings, its console lines
    console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    console.addFilter(ConsoleFilter())
    logging.basicConfig(level=logging.INFO, handlers=[console])
    try:
        config_dirs, argv = _config_dirs(argv)
        records = evaluate(argv[0], argv[1:], config_dirs)
    except KeyboardInterrupt:  # Ctrl-C: every setting finished is in results.json already (merged one by one)
        print("evaluate: interrupted; the settings evaluated so far are kept in results.json, rerun the command to "
              "evaluate the rest", file=sys.stderr)
        return 1
    except Exception as e:  # one line, as for python -m src.run and src.plan
        from src.launch.failures import one_line
        from src.launch.validate import hydra_error_line

        line = hydra_error_line(e) or one_line(e)
        print(f"evaluate: {line}", file=sys.stderr)
        # 2: bad input; 1: the file system refused a write (a full or read-only disk), as for src.preprocess.
        return 1 if refused_write(e) else 2
    for r in records:  # a null metric: samples that are not finite (a diverged run)
        clip, fid = ("null (not finite)" if v is None else f"{v:.4f}" for v in (r["clip_score"], r["fid_clip"]))
        print(f"{r['setting']:<28} {'ema' if r['ema'] else 'raw'}  n={r['n_samples']:<5} "
              f"clip_score {clip}  fid_clip {fid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
