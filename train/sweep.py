"""Sweep bookkeeping: the checks a multirun makes before any run starts, and skipping finished runs on a
resubmission. Run names are cltrain/names.py; the SLURM rendezvous for runs launched by Hydra's submitit
launcher is cltrain/rank_env.py.

A sweep is `clt-train -m +sweep=NAME ...` (configs/sweep/): every run lands in runs/<group>/<run name>,
with one W&B group per sweep. See launch/README.md.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from cltrain.errors import ConfigError
from cltrain.names import SWEPT_ENV
from cltrain.rank_env import dist_env

from . import checkpoint as ckpt
from .config import TrainSettings, compose, resolve_precision
from .model_io import META

MAX_RUNS_CHECKED = 512


# ----------------------------------------------------------------------------------------------------
# Before any run starts: every combination of the sweep composes into valid TrainSettings.


def _split_overrides(args: list[str]):
    """(fixed overrides, {key: [override strings]} of the sweeps) from command-line arguments."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed, sweeps = [], {}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (ov,) = parser.parse_overrides([arg])
        except Exception as e:  # Hydra reports its own parse errors; name the argument
            raise ConfigError(f"sweep argument {arg!r}: {str(e).splitlines()[0]}") from None
        key = ov.get_key_element()
        if key.startswith("hydra") or key.startswith("+hydra"):
            continue
        if ov.is_sweep_override():
            if ov.is_discrete_sweep():
                sweeps[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            else:  # interval sweeps belong to optimizing sweepers; checked per run by the job itself
                continue
        else:
            fixed.append(arg)
    return fixed, sweeps


def check_sweep(args: list[str]):
    """Compose and validate every run of `clt-train -m ARGS` before the first starts, so an invalid
    value (model.n_features=-1) stops the whole sweep naming it, instead of failing run by run.
    Returns the swept keys."""
    fixed, sweeps = _split_overrides(args)
    first = fixed + [v[0] for v in sweeps.values()]
    try:
        base = compose("train", first, return_hydra_config=True)
    except ConfigError as e:
        raise ConfigError(f"sweep: {e}") from None
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    for key, values in params.items():
        key = str(key)
        if key in sweeps:  # the command line wins over the preset
            continue
        from hydra.core.override_parser.overrides_parser import OverridesParser

        (ov,) = OverridesParser.create().parse_overrides([f"{key}={values}"])
        sweeps[key] = ([f"{key}={v}" for v in ov.sweep_string_iterator()] if ov.is_sweep_override()
                       else [f"{key}={values}"])
    combos = list(itertools.islice(itertools.product(*sweeps.values()), MAX_RUNS_CHECKED))
    for combo in combos:
        try:
            TrainSettings.from_config(compose("train", fixed + list(combo)))
        except ConfigError as e:
            raise ConfigError(f"sweep run [{' '.join(combo)}]: {e}; no run was started") from None
    return set(sweeps)


# ----------------------------------------------------------------------------------------------------
# Resubmission: a run whose OUT/model is this run's finished model is skipped.


def expected_fingerprint(s: TrainSettings, checkpoint: Path) -> dict:
    """This run's fingerprint (checkpoint.fingerprint) computed without building anything (a live run's
    stream described from `checkpoint`, its latest checkpoint)."""
    import torch

    from .data import DatasetInfo

    if s.data.source == "live":
        from .live import live_info_of_checkpoint

        info = live_info_of_checkpoint(s.data.live, s.seed, checkpoint)
    else:
        info = DatasetInfo.load(str(s.data.path))
    _, world, _ = dist_env()
    dp = max(world // s.parallel.feature_parallel, 1)
    dev_type = "cuda" if s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available()) else "cpu"
    layout = SimpleNamespace(world=world, dp_size=dp)
    return ckpt.fingerprint(s, info, layout, resolve_precision(s.precision, dev_type), s.resolve_steps(dp))


def finished_model(s: TrainSettings) -> Path | None:
    """OUT/model when it is this run's finished model (resume=true only: a resubmitted sweep): the latest
    checkpoint is at the run's last step with this run's fingerprint, and OUT/model was published from
    it. None otherwise (then the run resumes or starts)."""
    import json

    if s.resume is not True or s.stop_at_step is not None:
        return None
    out = Path(str(s.out_dir))
    model = out / "model"
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is None or not (model / META).is_file():
        return None
    try:
        saved = ckpt.read_trainer_state(latest)
        meta = json.loads((model / META).read_text())
    except (ckpt.CheckpointError, OSError, json.JSONDecodeError):
        return None
    want = expected_fingerprint(s, latest)
    have = saved.get("fingerprint", {})
    if ckpt.fingerprint_diff(have, want):
        return None
    steps = want["steps"]
    if int(saved.get("step", -1)) != steps or int(meta.get("train", {}).get("step", -1)) != steps:
        return None
    return model


# ----------------------------------------------------------------------------------------------------
# clt-train's entry, before Hydra


def mark_swept(argv: list[str]):
    """clt-train's main, before Hydra: in a multirun, check every run first, and tell the run-name
    resolver which keys are swept. Exits 2 with the message on bad input."""
    if not any(a in ("-m", "--multirun") for a in argv) and "+sweep=" not in " ".join(argv):
        return
    try:
        keys = check_sweep([a for a in argv[1:] if not a.startswith("-")])
    except ConfigError as e:
        print(f"clt-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    os.environ[SWEPT_ENV] = ",".join(sorted(keys))
