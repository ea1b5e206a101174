"""Config composition and validation for every cltrain command.

Hydra composes configs/; `validate_*` check values and stop with a ConfigError that names the key and
the value, before anything is built or written.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .clt import ACTIVATIONS, CLTConfig, LossWeights

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_GROUPS = ("model", "data", "optim", "parallel", "deepspeed", "logger", "sweep", "launcher")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the value."""


def compose(config_name: str = "train", overrides: list[str] | tuple[str, ...] = (),
            return_hydra_config: bool = False) -> DictConfig:
    """Compose a config outside a Hydra job (tests, notebooks), as the console scripts would."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _fail(key: str, value, expected: str):
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def require_positive_int(cfg, key: str, allow_none: bool = False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        _fail(key, v, "a positive integer" + (" or null" if allow_none else ""))


def require_number(cfg, key: str, lo: float | None = None, hi: float | None = None,
                   lo_open: bool = False, allow_none: bool = False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(key, v, "a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(key, v, f"a number {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        _fail(key, v, f"a number <= {hi}")


def require_choice(cfg, key: str, choices):
    v = _get(cfg, key)
    if v not in choices:
        _fail(key, v, f"one of {list(choices)}")


def validate_model(cfg: DictConfig, prefix: str = "model"):
    p = prefix + "."
    require_positive_int(cfg, p + "n_features")
    require_positive_int(cfg, p + "n_layers", allow_none=True)
    require_positive_int(cfg, p + "d_model", allow_none=True)
    require_choice(cfg, p + "activation", ACTIVATIONS)
    require_number(cfg, p + "bandwidth", lo=0, lo_open=True)
    require_number(cfg, p + "threshold_init", lo=0, lo_open=True)
    require_number(cfg, p + "threshold_calibration_rate", lo=0, hi=1, lo_open=True, allow_none=True)
    if _get(cfg, p + "activation") != "jumprelu":
        require_positive_int(cfg, p + "topk")
        if _get(cfg, p + "topk") > _get(cfg, p + "n_features"):
            _fail(p + "topk", _get(cfg, p + "topk"), f"at most model.n_features={_get(cfg, p + 'n_features')}")
    for key in ("sparsity_c", "lambda_s", "lambda_p", "auxk"):
        require_number(cfg, f"{p}loss.{key}", lo=0)
    require_number(cfg, p + "loss.lambda_s_ramp_fraction", lo=0, hi=1)
    require_positive_int(cfg, p + "loss.auxk_k")


def validate_train(cfg: DictConfig):
    """Check a composed clt-train config; raises ConfigError naming the first bad key."""
    validate_model(cfg)
    for key in ("steps", "batch_tokens", "grad_accum", "checkpoint_every", "log_every"):
        require_positive_int(cfg, key)
    require_choice(cfg, "precision", ("fp32", "bf16"))
    require_choice(cfg, "device", ("auto", "cpu", "cuda"))
    require_number(cfg, "optim.lr", lo=0, lo_open=True)
    require_number(cfg, "optim.eps", lo=0, lo_open=True)
    require_number(cfg, "optim.weight_decay", lo=0)
    require_number(cfg, "optim.grad_clip", lo=0)
    require_number(cfg, "optim.decay_fraction", lo=0, hi=1)
    betas = _get(cfg, "optim.betas")
    if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        _fail("optim.betas", None if betas is None else list(betas), "two numbers in [0, 1)")
    if not isinstance(_get(cfg, "optim.warmup_steps"), int) or _get(cfg, "optim.warmup_steps") < 0:
        _fail("optim.warmup_steps", _get(cfg, "optim.warmup_steps"), "an integer >= 0")
    require_positive_int(cfg, "parallel.feature_parallel")
    require_choice(cfg, "parallel.backend", ("auto", "gloo", "nccl"))
    require_choice(cfg, "deepspeed.zero_stage", (0, 1, 2, 3))
    if _get(cfg, "deepspeed.zero_stage") == 3 and _get(cfg, "parallel.feature_parallel") != 1:
        _fail("deepspeed.zero_stage", 3, "0, 1 or 2 with feature_parallel > 1 (ZeRO-3 runs over plain data parallel)")
    n_features, fp = _get(cfg, "model.n_features"), _get(cfg, "parallel.feature_parallel")
    if n_features % fp:
        _fail("model.n_features", n_features, f"a multiple of parallel.feature_parallel={fp}")
    require_choice(cfg, "logger.mode", ("offline", "online", "disabled"))
    require_choice(cfg, "data.on_error", ("raise", "skip"))


def clt_config(model_cfg: DictConfig, n_layers: int, d_model: int, n_features: int | None = None) -> CLTConfig:
    """The CLTConfig for a model config group; n_layers/d_model come from the dataset unless set."""
    for key, found in (("n_layers", n_layers), ("d_model", d_model)):
        want = model_cfg.get(key)
        if want is not None and want != found:
            raise ConfigError(f"config key 'model.{key}' = {want!r} but the dataset has {key}={found}")
    return CLTConfig(
        n_layers=n_layers, d_model=d_model,
        n_features=model_cfg.n_features if n_features is None else n_features,
        per_layer=bool(model_cfg.per_layer), activation=model_cfg.activation,
        bandwidth=float(model_cfg.bandwidth), threshold_init=float(model_cfg.threshold_init),
        straight_through_to_preact=bool(model_cfg.straight_through_to_preact),
        topk=int(model_cfg.topk))


def loss_weights(model_cfg: DictConfig, lambda_s: float) -> LossWeights:
    loss = model_cfg.loss
    return LossWeights(sparsity=lambda_s, preact=float(loss.lambda_p), sparsity_c=float(loss.sparsity_c),
                       auxk=float(loss.auxk), auxk_k=int(loss.auxk_k))
