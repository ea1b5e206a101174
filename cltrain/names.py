"""Run names: readable folder and W&B names from what distinguishes a run (clt-F4096-ls5), and the
`${cltrain.run_name:...}` resolver the configs use. A leaf module (imports nothing of the project).

A sweep is `clt-train -m +sweep=NAME ...` (configs/sweep/): every run lands in runs/<group>/<run name>,
named from what distinguishes it (architecture, dictionary size, lambda_s, and any other swept key).
Constant overrides (data.path=/a/b, steps=...) never enter a name."""
from __future__ import annotations

import os
import re

from omegaconf import OmegaConf


# Keys swept on the command line (set by clt-train's main before Hydra starts, read by the run-name
# resolver inside each job; the environment reaches joblib workers and SLURM jobs alike).
SWEPT_ENV = "CLTRAIN_SWEPT_KEYS"


# Already in the base of every name.
NAME_KEYS = ("model", "model.per_layer", "model.n_features", "model.loss.lambda_s", "model.activation",
             "model.topk")


# Sweep-level keys that never distinguish runs (paths, the sweep's own settings).
NEVER_IN_NAME = ("data.path", "out_dir", "resume", "logger.group", "logger.mode", "logger.project",
                 "logger.entity", "progress")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def clean(text: str) -> str:
    """A value as a single path component: no slashes (no nested folders), no spaces or quotes."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_") or "x"


def base_name(per_layer, n_features, lambda_s, activation="jumprelu", topk=0) -> str:
    """clt-F4096-ls5 / plt-F1024-ls0.5; TopK / BatchTopK runs add their k (their lambda_s is unused)."""
    arch = "plt" if str(per_layer).lower() in ("true", "1") else "clt"
    name = f"{arch}-F{n_features}"
    if activation in ("topk", "batchtopk"):
        return f"{name}-{activation}{topk}"
    try:
        lam = _fmt(float(lambda_s))
    except (TypeError, ValueError):
        lam = str(lambda_s)
    return f"{name}-ls{lam}"


def swept_keys() -> set[str]:
    """Keys that take several values in this sweep: the command line's (SWEPT_ENV) and the preset's
    hydra.sweeper.params."""
    keys = {k for k in os.environ.get(SWEPT_ENV, "").split(",") if k}
    try:
        from hydra.core.hydra_config import HydraConfig

        params = HydraConfig.get().sweeper.get("params") or {}
        keys |= {str(k).lstrip("+~") for k in params}
    except (ValueError, AttributeError):
        pass
    return keys


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ValueError, AttributeError):
        return []


def run_name(per_layer, n_features, lambda_s, activation="jumprelu", topk=0) -> str:
    """The `cltrain.run_name` resolver: the base name plus `key-value` for every other swept key of
    this job (so runs that differ only in, e.g., optim.lr get different folders)."""
    name = base_name(per_layer, n_features, lambda_s, activation, topk)
    swept = swept_keys() - set(NAME_KEYS) - set(NEVER_IN_NAME)
    extra = []
    for ov in _task_overrides():
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in swept:
            extra.append(f"{key.split('.')[-1]}{clean(value)}")
    return "-".join([name] + sorted(extra))


# ${cltrain.run_name:...} (the sweep presets' readable run names): registered on import, which every
# module that composes or resolves a config does (train/config.py imports this module).
if not OmegaConf.has_resolver("cltrain.run_name"):
    OmegaConf.register_new_resolver("cltrain.run_name", run_name)
