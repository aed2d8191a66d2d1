"""Configuration errors before Hydra creates anything: every job of a sweep is checked before the first is launched.

Hydra creates a job's run directory (and configures its log file there) before it calls the task function, so a
check inside the job comes too late to leave nothing behind. Here the same checks (src.training.prepare.check_config:
values, loss, data, model on the meta device, evaluation files) run earlier:
- a multirun: the tagging sweeper (src/launch/sweeper.py) composes every job's configuration and checks it before
  any job is launched; a job with an error is not launched, its one-line error goes to the end-of-sweep summary
  and to `<sweep dir>/failures.json` (src/launch/failures.py), and the valid jobs run (fail_fast=true launches
  none);
- a single run: a Hydra callback (`hydra.callbacks.check_config` in conf/config.yaml) checks the configuration
  when the run starts, before its directory exists, and exits with the one-line error.
The job checks again when it starts (cheap, cached), for callers that bypass both (tests, other sweepers).
"""

from __future__ import annotations

import difflib

import fnmatch
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.launch.failures import forget_nameless_failures, grouped, one_line, record_failure, record_sweep_failure

log = logging.getLogger(__name__)


def job_name(cfg: DictConfig, overrides: Sequence[str] | None = None) -> str:
    """The job's run name; for a job whose run name cannot be formed (an invalid recipe names none), its dataset
    and recipe overrides (`digits/loss=rf_lognorm,loss.s=-1`), or else all its overrides (default: Hydra's)."""
    name = run_name(cfg)
    if name is not None:
        return name
    if overrides is None:
        try:
            overrides = [str(o) for o in HydraConfig.get().overrides.task]
        except Exception:
            return "job"
    loss = [o for o in overrides if o.lstrip("+~").startswith("loss")]
    tag = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.startswith("run_tag=")]
    data = cfg.data.get("name", "?") if "data" in cfg else "?"
    return f"{data}/{','.join(loss)}{''.join(tag)}" if loss else " ".join(overrides) or "job"


def sweep_job_name(config_loader, sweep_config: DictConfig, overrides: Sequence[str]) -> str:
    """job_name of one job of a sweep, from its overrides (a launcher naming a job that returned nothing: killed,
    cancelled); its overrides when its configuration cannot be composed."""
    from hydra.core.utils import filter_overrides

    previous = HydraConfig.instance().cfg
    try:
        cfg = config_loader.load_sweep_config(sweep_config, list(overrides))
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in run names
        return job_name(cfg, overrides)
    except Exception:  # noqa: BLE001 -- a name for a summary line; the overrides say which job it was
        return " ".join(filter_overrides(list(overrides))) or "job"
    finally:
        HydraConfig.instance().cfg = previous


def run_name(cfg: DictConfig) -> str | None:
    """The job's run name, or None when its configuration forms none (an invalid recipe)."""
    try:
        return str(cfg.run_name)
    except Exception:
        return None


#: The configuration's own sections (conf/): a key added under one of them with `+` is read by nothing.
SECTIONS = ("loss", "model", "data", "sampler", "optim", "train", "trainer", "eval", "logger", "paths")


def check_added_keys(overrides: Sequence[str], cfg: DictConfig | None = None) -> None:
    """`+train.max_step=100` (a typo of an existing key, added with `+`) would be accepted and ignored: refused.
    So is a key under a section that does not exist (`+trian.max_steps=100`).
    `+sweep=NAME` (a config group), `++key=value`, keys under hydra and keys added to a node that is instantiated
    (`_target_`: `+trainer.strategy.cpu_offload=true`, passed to its class) stay allowed."""
    for override in overrides:
        key = str(override).split("=", 1)[0]
        if key.startswith("+") and not key.startswith("++") and "." not in key and key[1:] in (cfg or {}) \
                and not _interpolated(cfg, key[1:]):
            # +torch_thread=1: a top-level key of its own (a config group, +sweep=NAME, adds none); one that an
            # interpolation reads (+tag=x run_name='${data.name}/${tag}') is a setting
            close = difflib.get_close_matches(key[1:], [k for k in cfg if k != key[1:]], n=1)
            raise ConfigError(f"{override}: {key[1:]} is not a setting of this configuration, so nothing would read "
                              f"it{f' (a typo of {close[0]}?)' if close else ''}; set an existing key without '+'")
        if not (key.startswith("+") and not key.startswith("++") and "." in key):
            continue
        section = key[1:].split(".")[0]
        if section not in SECTIONS and section != "hydra":  # (the composed configuration holds the addition)
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            raise ConfigError(f"{override}: {section} is not a section of this configuration, so nothing would read "
                              f"it{f' (a typo of {close[0]}?)' if close else ''}; the sections: {', '.join(SECTIONS)}")
        if section not in SECTIONS:
            continue
        parent = OmegaConf.select(cfg, key[1:].rsplit(".", 1)[0], default=None) if cfg is not None else None
        if OmegaConf.is_dict(parent) and "_target_" in parent:
            continue
        raise ConfigError(f"{override}: {key[1:]} is not a setting of this configuration, so nothing would read it "
                          f"(a typo?); set an existing key without '+'")


def _interpolated(cfg: DictConfig, name: str) -> bool:
    """Whether an interpolation of cfg (unresolved: `${name}`, `${oc.select:name,...}`) names the top-level key."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)")

    def strings(node):
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) and "${" in node else []

    container = OmegaConf.to_container(cfg, resolve=False)
    return any(pattern.search(s) for s in strings(container))


def config_error(cfg: DictConfig, overrides: Sequence[str] | None = None, multirun: bool = False
                 ) -> ConfigError | None:
    """The first configuration error of a composed job configuration (hydra key included or not), or None.
    overrides: the job's command-line overrides (default: Hydra's); multirun: a job of a sweep (the launch checks
    that only a sweep has, e.g. Lightning's own re-launch of the ranks). The configuration is not changed."""
    from src.training.prepare import check_config

    try:
        if overrides is None:
            try:
                overrides = [str(o) for o in cfg.hydra.overrides.task]
            except Exception:  # noqa: BLE001 -- a configuration without Hydra's key (tests, callers)
                overrides = []
        check_added_keys(overrides, cfg)
        check_config(cfg, multirun)
    except ConfigError as e:
        return e
    except Exception as e:  # a setting that breaks a check in another way (an interpolation that does not resolve)
        return ConfigError(one_line(e))
    return None


def refused_by_run_dir(cfg: DictConfig) -> ConfigError | None:
    """The refusal of a relaunch into a run directory trained under another configuration (the job's own check),
    found before anything is launched, so that a sweep refused whole writes nothing; None when there is nothing to
    compare or the comparison cannot be made here (the job checks again)."""
    from src.training.prepare import check_fingerprint, check_trained_precision, resolve_data

    try:
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        if nested := nested_run_dir(Path(str(cfg.hydra.sweep.dir)), run_dir):
            return nested
        if not_a_folder := run_dir_not_a_folder(run_dir):
            return not_a_folder
        if not (run_dir / "fingerprint.json").is_file():
            return None
        resolved = cfg.copy()
        resolve_data(resolved)  # the data keys of the fingerprint (a bound run's data exist)
        check_fingerprint(resolved, run_dir)
        here = launch_precision(resolved)  # not this login node's device: the jobs' (None: the job checks)
        if here is not None:
            check_trained_precision(resolved, run_dir, here, "where this launch trains")
    except ConfigError as e:
        return e
    except Exception:  # noqa: BLE001 -- left to the job, which reports it in its own way
        return None
    return None


def run_dir_not_a_folder(run_dir: Path) -> ConfigError | None:
    """A run directory that is a link to nothing (its target moved or deleted) or a file: Hydra's mkdir fails on it
    with `File exists`, which stopped the whole sweep."""
    if not os.path.lexists(run_dir) or run_dir.is_dir():
        return None
    kind = f"a link to nothing ({os.readlink(run_dir)})" if run_dir.is_symlink() else "a file, not a folder"
    return ConfigError(f"run directory {run_dir} is {kind}; restore what it names, or remove it to run the job there")


def nested_run_dir(sweep_dir: Path, run_dir: Path) -> ConfigError | None:
    """A run directory inside an earlier launch's (the sweep relaunched with a key added, sampler=rf_time,ab2:
    digits/rf/sampler=ab2 inside digits/rf), or around its run directories (the key taken away): the rank report
    does not look inside a run directory, so it counted the inner runs as never started and ranked without them."""
    from src.ranking.aggregate import find_run_dirs, is_run_dir

    way_out = "the rank report does not look inside a run directory; use another sweep_name"
    subdir = run_dir.relative_to(sweep_dir)
    outer = next((p for p in reversed(subdir.parents[:-1]) if is_run_dir(sweep_dir / p)), None)
    if outer is not None:
        return ConfigError(f"run directory {subdir} would lie inside {outer}, the run directory of an earlier launch "
                           f"of this sweep: {way_out}")
    inner = find_run_dirs(run_dir) if run_dir.is_dir() and not is_run_dir(run_dir) else []
    if inner:
        return ConfigError(f"run directory {subdir} would hold {inner[0].relative_to(sweep_dir)}, the run directory "
                           f"of an earlier launch of this sweep: {way_out}")
    return None


def launch_precision(cfg: DictConfig, single: bool = False) -> str | None:
    """What the launched jobs train at (trainer.precision; null: bf16-mixed on a GPU, else 32-true) where the launch
    names their device: trainer.accelerator=cpu, a SLURM launch's GPUs (gpus_per_node, gpus_per_task or a gpu gres),
    this machine for a local launch or a single run (no -m: no launcher). None for a SLURM launch that asks for no
    GPUs (a partition may give them by default): the job checks."""
    from src.training.prepare import resolved_precision

    trainer, launcher = cfg.trainer, OmegaConf.select(cfg, "hydra.launcher", default=None) or {}
    if single or trainer.precision is not None or trainer.accelerator == "cpu" or "gpus_per_node" not in launcher:
        return resolved_precision(trainer)
    return "bf16-mixed" if asks_for_gpus(launcher) else None


def asks_for_gpus(launcher) -> bool:
    """Whether a SLURM launcher's settings request GPUs: gpus_per_node or gpus_per_task, or a gres naming gpu (its
    own or an sbatch option in additional_parameters: gres=gpu:8, gpus=8, gpus-per-node=8)."""
    extra = launcher.get("additional_parameters") or {}
    counts = [launcher.get("gpus_per_node"), launcher.get("gpus_per_task"),
              *(extra.get(k) for k in ("gpus", "gpus_per_node", "gpus-per-node", "gpus_per_task", "gpus-per-task"))]
    gres = [str(g) for g in (launcher.get("gres"), extra.get("gres")) if g]
    return any(counts) or any(g.startswith("gpu") or ",gpu" in g for g in gres)


def misplaced_option(argv: Sequence[str]) -> str | None:
    """The one-line error of a Hydra option between overrides (`loss=rf -m loss=edm`): Hydra's argument parser reads
    the overrides after it as unrecognized arguments, in a usage message of eight lines. None otherwise (options
    before the overrides, or after all of them, are read)."""
    overrides = [i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")]
    between = range(overrides[0] + 1, overrides[-1]) if overrides else range(0)
    option = next((i for i in between if argv[i].startswith("-")), None)
    if option is None:
        return None
    later = next(argv[i] for i in overrides if i > option)
    return (f"{argv[option]}: Hydra's options go before the overrides (python -m src.run {argv[option]} "
            f"{argv[overrides[0]]} ...), here {later} follows it")


def hydra_error_line(exc: BaseException) -> str | None:
    """Hydra's own composition and override errors in one line that names the setting, the value and what is
    allowed (Hydra prints several lines: the options one per line, the config search path); None for others."""
    from hydra.errors import (CompactHydraException, ConfigCompositionException, MissingConfigException,
                              OverrideParseException)

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, value = str(exc.missing_cfg_file).rpartition("/")
        options = exc.options
        named = re.search(r"Available options in '([^']+)'", str(exc))  # the override's group: loss=paper/x is loss
        if named and group.startswith(named.group(1) + "/"):  # an option in a subfolder: loss=paper/edm_0.60_1.21
            sub = group[len(named.group(1)) + 1:]
            group, value = named.group(1), f"{sub}/{value}"
            options = [f"{sub}/{o}" for o in packaged_options(f"{group}/{sub}")] or options
        return f"{group}={value}: no such option in config group {group}; allowed: {', '.join(options)}"
    if isinstance(exc, OverrideParseException):
        grammar = "https://hydra.cc/docs/advanced/override_grammar/basic"
        return f"{exc.override}: not a valid override ({exc.message.splitlines()[0]}); the syntax: {grammar}"
    if isinstance(exc, ConfigCompositionException):
        from omegaconf.errors import KeyValidationError, ValidationError

        key = getattr(exc.__cause__, "full_key", None)
        parent = getattr(exc.__cause__, "parent_node", None)
        if key and isinstance(exc.__cause__, ValidationError) and not isinstance(exc.__cause__, KeyValidationError):
            # A value of the wrong type for a typed setting (hydra.launcher.timeout_min=abc): the key exists.
            reason = str(exc.__cause__.msg or exc.__cause__).splitlines()[0]
            return f"{key}={getattr(exc.__cause__, 'value', '?')}: not a valid value ({reason})"
        if key:
            known = list(parent.keys()) if OmegaConf.is_dict(parent) else []
            section = key.rsplit(".", 1)[0] if "." in key else "the configuration"
            allowed = f"; the settings of {section}: {', '.join(map(str, known))}" if known else ""
            return f"{key}: no such setting (a typo?){allowed}"
    if isinstance(exc, CompactHydraException):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return " ".join(lines) if lines else None
    return None


def packaged_options(group: str) -> list[str]:
    """The options of a configuration group in conf/ (a subfolder: loss/paper); [] where it has none."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.object_type import ObjectType

    return ConfigLoaderImpl(create_config_search_path("pkg://conf")).get_group_options(group, ObjectType.CONFIG)


def check_sweep_jobs(config_loader, sweep_config: DictConfig, batches: list[list[list[str]]],
                     planned: dict | None = None) -> list[list[list[str]]]:
    """The batches without their invalid jobs (none at all under fail_fast when one is invalid); every invalid job is
    recorded (summary, `<sweep dir>/failures.json`) and named on stderr before anything is launched.
    planned: filled with {run name: {"run_dir", "overrides"}} of the valid jobs (for the sweep's jobs.json)."""
    previous = HydraConfig.instance().cfg
    kept, invalid = [], []  # invalid: (run name or None, its name for messages, the error line)
    runs: dict[str, tuple[list[str], dict]] = {}  # run directory -> the first job's overrides and settings
    try:
        for batch in batches:
            valid = []
            for overrides in batch:
                job_cfg = config_loader.load_sweep_config(sweep_config, list(overrides))
                HydraConfig.instance().set_config(job_cfg)  # for ${hydra:...} in run names
                local = str(OmegaConf.select(job_cfg, "hydra.launcher._target_", default="")).endswith(
                    "BasicLauncher")  # a SLURM job's ranks are started by SLURM: the job checks them itself
                error = (config_error(job_cfg, list(overrides), multirun=local) or unnamed_run_dir(job_cfg)
                         or refused_by_run_dir(job_cfg))
                if error is None:
                    twin = same_run_dir(job_cfg, list(overrides), runs)
                    if twin is not None and not twin.refused:
                        log.warning("%s", twin.line, extra={"console": True})  # an earlier job's run: launched once
                        continue
                    if twin is not None:
                        shown = f"{job_name(job_cfg, overrides)} [{twin.apart}]"
                        invalid.append((None, shown, twin.line))  # a stand-in name: the twin's run clears no entry
                        record_failure(shown, twin.line)
                        continue
                    valid.append(overrides)
                    if planned is not None:
                        planned[job_name(job_cfg, overrides)] = {"run_dir": str(job_cfg.hydra.sweep.subdir),
                                                                 "overrides": [str(o) for o in overrides]}
                    continue
                name, line = job_name(job_cfg, overrides), one_line(error)
                invalid.append((run_name(job_cfg), name, line))
                record_failure(name, line)
            if valid:
                kept.append(valid)
    finally:
        HydraConfig.instance().cfg = previous
    for line in grouped([(shown, error) for _, shown, error in invalid]):  # jobs refused alike: one line
        log.error("not launched: %s", line)
    if invalid and sweep_config.get("fail_fast"):
        log.error("fail_fast: %d job(s) have configuration errors; launching none", len(invalid))
        return []
    # Kept in the sweep's failures.json (its report then knows a job is missing) only when the sweep launches
    # something: a command refused whole changes nothing. A later run of the job's name clears its entry; a job
    # without a run name (an invalid recipe) has a stand-in name no run has, so each launch replaces those.
    if kept:
        sweep_dir = str(sweep_config.hydra.sweep.dir)
        forget_nameless_failures(sweep_dir)
        for name, shown, line in invalid:
            record_sweep_failure(sweep_dir, shown, line, nameless=name is None)
    return kept


def device_error(cfg: DictConfig) -> ConfigError | None:
    """A setting this machine cannot train with (a CUDA-only attention kernel on the CPU): a single run trains here,
    so it is refused before its directory exists; a sweep's jobs check it where they run."""
    from src.training.prepare import check_device_settings

    try:
        check_device_settings(cfg)
    except ConfigError as e:
        return e
    return None


class CheckConfigOnRunStart(Callback):
    """A single run's configuration checked before Hydra creates its directory; an error ends the command with
    its one line (exit status 1)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        previous = HydraConfig.instance().cfg
        try:
            HydraConfig.instance().set_config(config)
            error = (config_error(config) or device_error(config)
                     or run_dir_not_a_folder(Path(str(config.hydra.run.dir))))
        finally:
            HydraConfig.instance().cfg = previous
        if error is not None:
            sys.exit(one_line(error))  # printed on stderr, exit status 1; nothing was created


def unnamed_run_dir(cfg: DictConfig) -> ConfigError | None:
    """A run directory that cannot be named before the job is launched: `hydra.sweep.subdir=${hydra.job.num}`
    (Hydra's own default) is set only at launch, and would name a run by its place in the sweep, so a relaunch with
    other jobs would resume or skip the wrong runs."""
    try:
        str(cfg.hydra.sweep.subdir)
    except Exception as e:  # noqa: BLE001 -- an interpolation Hydra fills only when the job is launched
        value = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
        return ConfigError(f"hydra.sweep.subdir={value}: does not resolve before the job is launched "
                           f"({type(e).__name__}); a run directory is named from the job's configuration, so that "
                           "rerunning the command finds each run to resume or skip it: keep the default ${run_name}")
    return None


def job_settings(cfg: DictConfig) -> dict:
    """A job's configuration without Hydra's own node (its overrides, its directories), unresolved: two jobs with
    equal settings are the same run."""
    settings = OmegaConf.to_container(cfg, resolve=False)
    settings.pop("hydra", None)
    return settings


def _apart(overrides: Sequence[str], other: Sequence[str]) -> str:
    """The overrides of a job that another job lacks, as said on the console (the sweeper's run tag left out)."""
    return ", ".join(o for o in overrides if o not in other and not o.startswith("run_tag=")) or "the same overrides"


def _unnamed(settings: dict) -> dict:
    """Settings without the keys that only name the run (its directory and its tag)."""
    return {k: v for k, v in settings.items() if k not in ("run_name", "run_tag")}


def differing_keys(a, b, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested containers (a key missing on one side differs)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "(the configuration)"]
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        both = key in a and key in b
        out += differing_keys(a[key], b[key], f"{prefix}{key}.") if both else [f"{prefix}{key}"]
    return [k.rstrip(".") for k in out]


class SameRun(NamedTuple):
    """A job whose run is an earlier job's (same_run_dir)."""

    refused: bool  # False: the same settings, launched once; True: other settings in the same directory
    apart: str  # the overrides that tell the job apart from the earlier one
    line: str  # what the console says


def same_run_dir(cfg: DictConfig, overrides: list[str], runs: dict[str, tuple[list[str], dict]]) -> SameRun | None:
    """Whether a sweep's job names a run directory an earlier job of the sweep has: `-m optim.lr=1e-4,0.0001` or
    `loss.m=0,0.0` spell one value twice; a run_name that leaves out a swept key sends two configurations to one
    directory. None for a new directory (recorded in runs), else a SameRun. With the earlier job's settings it is
    the same run, launched once (two array tasks in one directory would write each other's checkpoints); with other
    settings it is refused: both would train into one directory, which the second would refuse, or, on a SLURM
    array, corrupt."""
    run_dir, settings = str(cfg.hydra.sweep.subdir), job_settings(cfg)
    if run_dir not in runs:
        # Equal settings under another tag (`optim.warmup_steps=50,50.0` tags "50" and "50.0"): the same training.
        twin = next((d for d, (_, s) in runs.items() if _unnamed(s) == _unnamed(settings)), None)
        if twin is not None:
            own, other = _apart(overrides, runs[twin][0]), _apart(runs[twin][0], overrides)
            return SameRun(False, own, f"{run_dir}: {own} is the same run as {other} (equal settings, in {twin}): "
                                      "launched once")
        runs[run_dir] = (overrides, settings)
        return None
    first, first_settings = runs[run_dir]
    own, other = _apart(overrides, first), _apart(first, overrides)
    if first_settings == settings:  # -m seed=0,0 gives one job twice: no override tells them apart
        said = f"{own} is the same run as {other}" if list(overrides) != list(first) else "the same job given twice"
        return SameRun(False, own, f"{run_dir}: {said} (equal settings): launched once")
    keys = differing_keys(first_settings, settings)
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    # The sweeper tags no key of name_keys: values the run name rounds alike (the recipe slug gives loss parameters
    # to two decimals, loss.m=0.001,0.002) share a directory under the default run_name too.
    named = [str(p) for p in (cfg.get("name_keys") or ())]
    hint = ("; the recipe's name gives its parameters to two decimals: sweep with name_keys=[data,data.name] to add "
            "them to the run tag") \
        if named and all(any(fnmatch.fnmatchcase(k, p) for p in named) for k in keys) else ""
    return SameRun(True, own, f"run directory {run_dir} is also that of the job with {other}, whose settings differ "
                              f"({shown}); run_name must tell the jobs apart (the default names the dataset and the "
                              f"recipe, and the sweeper adds each swept key outside name_keys){hint}")


def filter_sweep(sweeper, batches: Sequence, planned: dict | None = None) -> list:
    """check_sweep_jobs for a Hydra sweeper after its setup (its config loader and configuration)."""
    return check_sweep_jobs(sweeper.hydra_context.config_loader, sweeper.config, [list(b) for b in batches], planned)
