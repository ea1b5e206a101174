"""Config composition and validation for every cltrain command.

Hydra composes configs/; `validate_*` check values and stop with a ConfigError that names the key and
the value, before anything is built or written. Every key a command reads is listed in a schema below
with its check, so a key that is not listed (a typo, even one added with `+`) is refused too; the
documented extension points are listed in EXTENSION_POINTS (and in configs/train.yaml, docs/operations.md).

Checks that need the launched job (world size, GPU) are in `validate_runtime`, which the trainer calls
once the launcher's environment is known, before any process group or device is set up.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from cltrain.errors import ConfigError

from .clt import ACTIVATIONS, CLTConfig, LossWeights

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_GROUPS = ("model", "data", "optim", "parallel", "deepspeed", "logger", "sweep")

# What a user may add to a clt-train config beyond the schema:
#   +sweep=NAME     a sweep preset (configs/sweep/): Hydra multirun settings; sets only known keys otherwise
#   hydra.*         Hydra's own settings (run dir, sweeper, logging, hydra/launcher=local|slurm); never part
#                   of the job's config
EXTENSION_POINTS = ("+sweep=NAME", "hydra.*")
_FREE_ROOTS = ("hydra",)  # present only with return_hydra_config=True; Hydra validates it itself


def compose(config_name: str = "train", overrides: list[str] | tuple[str, ...] = (),
            return_hydra_config: bool = False) -> DictConfig:
    """Compose a config outside a Hydra job (tests, notebooks), as the console scripts would.

    Hydra's own errors (a bad override syntax, an unknown group option such as model=foo, a key that
    does not exist given without `+`) are raised as ConfigError with Hydra's message."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra appends its config search path: noise for a user who mistyped a value
        raise ConfigError(f"{config_name} config: {str(e).split(chr(10) + 'Config search path')[0].strip()}") from None
    # As under a Hydra job, so that ${hydra:...} values (the sweep presets use them) resolve.
    HydraConfig.instance().set_config(cfg)
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _fail(key: str, value, expected: str):
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def require_positive_int(cfg, key: str, allow_none: bool = False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if not _is_int(v) or v <= 0:
        _fail(key, v, "a positive integer" + (" or null" if allow_none else ""))


def require_number(cfg, key: str, lo: float | None = None, hi: float | None = None,
                   lo_open: bool = False, allow_none: bool = False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if not _is_number(v):
        _fail(key, v, "a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(key, v, f"a number {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        _fail(key, v, f"a number <= {hi}")


def require_choice(cfg, key: str, choices):
    v = _get(cfg, key)
    # `is`/type-equal comparison: True == 1 must not pass for a stage number, nor 1 for true
    if not any(type(v) is type(c) and v == c for c in choices):
        _fail(key, v, f"one of {list(choices)}")


# ----------------------------------------------------------------------------------------------------
# Per-key checks. Each is a callable (key, value) that raises ConfigError; `required` says whether the
# key must be present (Hydra's `~key` deletes keys; optional ones belong to some group options only).


class Check:
    def __init__(self, fn, expected: str, required: bool = True):
        self.fn, self.expected, self.required = fn, expected, required

    def __call__(self, key, value):
        if not self.fn(value):
            _fail(key, value, self.expected)

    def optional(self) -> "Check":
        return Check(self.fn, self.expected, required=False)


def Int(lo: int | None = None, hi: int | None = None, none: bool = False, why: str = "",
        text: str | None = None) -> Check:
    if text is None:
        if lo == 1 and hi is None:
            text = "a positive integer"
        elif hi is None:
            text = f"an integer >= {lo}" if lo is not None else "an integer"
        else:
            text = f"an integer in [{lo}, {hi}]"
    return Check(lambda v: (v is None and none) or (_is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)),
                 text + (" or null" if none else "") + why)


def Num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, none: bool = False) -> Check:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"<= {hi}")
    text = "a finite number" + (" " + " and ".join(parts) if parts else "") + (" or null" if none else "")

    def ok(v):
        if v is None:
            return none
        if not _is_number(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or v <= hi

    return Check(ok, text)


def Choice(*choices) -> Check:
    return Check(lambda v: any(type(v) is type(c) and v == c for c in choices),
                 f"one of {list(choices)}")


Bool = Check(lambda v: isinstance(v, bool), "true or false")


def Text(none: bool = False) -> Check:
    return Check(lambda v: (v is None and none) or (isinstance(v, str) and v.strip() != ""),
                 "a non-empty string" + (" or null" if none else ""))


def PathLike(none: bool = False) -> Check:
    # Hydra parses `out_dir=2024` as an int; a number is a usable folder name, so it is accepted.
    return Check(lambda v: (v is None and none) or (isinstance(v, str) and v.strip() != "")
                 or (_is_number(v)), "a path or URL" + (" or null" if none else ""))


def TextList(none: bool = False) -> Check:
    return Check(lambda v: (v is None and none) or (isinstance(v, list) and all(
        isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v)),
        "a list of strings, e.g. [a,b]" + (" or null" if none else ""))


Betas = Check(lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. [0.9,0.999]")
Resume = Check(lambda v: isinstance(v, bool) or (isinstance(v, str) and v.strip() != ""),
               "true, false or a checkpoint folder")
Fused = Choice("auto", True, False)
# Several dictionaries per data pass (train/multi.py): null, or a list of overrides of model.* / optim.*
# keys, one mapping per dictionary, e.g. [{model.n_features: 1024}, {model.n_features: 2048}].
DICTIONARY_PREFIXES = ("model.", "optim.")
Dictionaries = Check(lambda v: v is None or (isinstance(v, list) and len(v) >= 1 and all(
    isinstance(d, dict) and all(isinstance(k, str) and k.startswith(DICTIONARY_PREFIXES) for k in d) for d in v)),
    "null or a non-empty list of mappings of model.* / optim.* keys, e.g. [{model.n_features: 1024}]")
Layers = Check(lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)
                                       and v[0] <= v[1]), "null or [first, last] with 0 <= first <= last")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
KERNELS = ("auto", "dense", "torch_sparse", "triton")  # cltrain.kernels.IMPLEMENTATIONS plus auto
LOGGER_MODES = ("offline", "online", "disabled")

MODEL_SCHEMA = {
    "n_layers": Int(1, none=True),
    "d_model": Int(1, none=True),
    "n_features": Int(1),
    "per_layer": Bool,
    "activation": Choice(*ACTIVATIONS),
    "topk": Int(0),
    "bandwidth": Num(0, lo_open=True),
    "threshold_init": Num(0, lo_open=True),
    "threshold_calibration_rate": Num(0, 1, lo_open=True, none=True),
    "straight_through_to_preact": Bool,
    "loss.sparsity_c": Num(0),
    "loss.lambda_s": Num(0),
    "loss.lambda_s_ramp_fraction": Num(0, 1),
    "loss.lambda_p": Num(0),
    "loss.auxk": Num(0),
    "loss.auxk_k": Int(1),
}

LOGGER_SCHEMA = {
    "mode": Choice(*LOGGER_MODES),
    "project": Text(),
    "entity": Text(none=True),
    "run_name": PathLike(),
    "group": Text(none=True),
    "tags": TextList(),
}

TRAIN_SCHEMA = {
    "seed": Int(0, 2**63 - 1, text="an integer in [0, 2^63)"),
    "steps": Int(1, none=True),
    "train_tokens": Int(1, none=True),
    "batch_tokens": Int(1),
    "grad_accum": Int(1),
    "precision": Choice(*PRECISIONS),
    "device": Choice(*DEVICES),
    "out_dir": PathLike(),
    "checkpoint_every": Int(1),
    "resume": Resume,
    "overwrite": Bool,
    "stop_at_step": Int(0, none=True),
    "log_every": Int(1),
    "eval_every": Int(0, why=" (steps; 0: off)"),
    "eval_tokens": Int(1),
    "keep_checkpoints": Int(0, why=" (0: keep all)"),
    "dead_after_tokens": Int(1),
    "dense_fire_rate": Num(0, 1, lo_open=True),
    "kernels": Choice(*KERNELS),
    "progress": Bool,
    "check_memory": Bool,
    **{f"model.{k}": c for k, c in MODEL_SCHEMA.items()},
    "data.path": PathLike(none=True),
    "data.heldout_shards": Int(0),
    "data.shuffle_buffer": Int(1, why=" (tokens; the loader's token-level shuffle cannot be turned off)"),
    "data.num_workers": Int(0),
    "data.on_error": Choice("raise", "skip"),
    "data.timeout": Num(0, lo_open=True),
    "data.verify": Bool,
    "data.verify_upfront": Bool,
    "data.allow_change_on_resume": Bool,
    "optim.lr": Num(0, lo_open=True),
    "optim.betas": Betas,
    "optim.eps": Num(0, lo_open=True),
    "optim.weight_decay": Num(0),
    "optim.grad_clip": Num(0),
    "optim.warmup_steps": Int(0),
    "optim.decay_fraction": Num(0, 1),
    "optim.fused": Fused.optional(),
    "parallel.feature_parallel": Int(1),
    "parallel.backend": Choice("auto", "gloo", "nccl"),
    "deepspeed.zero_stage": Choice(0, 1, 2, 3),
    "deepspeed.overlap_comm": Bool,
    "deepspeed.reduce_bucket_size": Int(1, none=True).optional(),
    "deepspeed.allgather_bucket_size": Int(1, none=True).optional(),
    "deepspeed.stage3_param_persistence_threshold": Int(0, none=True).optional(),
    **{f"logger.{k}": c for k, c in LOGGER_SCHEMA.items()},
    "dictionaries": Dictionaries,
}

EVAL_SCHEMA = {
    "sweep_dir": PathLike(none=True),
    "model_dir": PathLike(none=True),
    "out_dir": PathLike(none=True),
    "dataset": PathLike(none=True),
    "split": Choice("heldout", "all"),
    "heldout_shards": Int(1),
    "max_tokens": Int(1, none=True),
    "batch_tokens": Int(1),
    "dense_threshold": Num(0, 1, lo_open=True),
    "device": Choice(*DEVICES),
    "progress": Bool,
    "frontier": TextList(none=True),
    "replacement.enabled": Bool,
    "replacement.model": PathLike(none=True),
    "replacement.text": PathLike(none=True),
    "replacement.skip_harvested": Bool,
    "replacement.skip_documents": Int(0),
    "replacement.n_sequences": Int(1),
    "replacement.seq_len": Int(1),
    "replacement.batch_size": Int(1),
    "replacement.skip_bos": Bool,
    # attribution graphs (train/graphs.py's GraphSettings checks the values between keys)
    "graphs.enabled": Bool,
    "graphs.prompts": PathLike(),
    "graphs.n_prompts": Int(1),
    "graphs.heldout_tokens": Int(2),
    "graphs.model": PathLike(none=True),
    "graphs.export": PathLike(none=True),
    "graphs.max_feature_nodes": Int(1, none=True),
    "graphs.max_n_logits": Int(1),
    "graphs.desired_logit_prob": Num(0, 1, lo_open=True),
    "graphs.batch_size": Int(1),
    "graphs.save": Bool,
    "graphs.node_threshold": Num(0, 1),
    "graphs.edge_threshold": Num(0, 1),
    **{f"logger.{k}": c for k, c in LOGGER_SCHEMA.items()},
}

EXPORT_SCHEMA = {
    "model_dir": PathLike(none=True),
    "out_dir": PathLike(none=True),
    "overwrite": Bool,
    "dtype": Choice("float32", "bfloat16", "float16"),
    "model_name": Text(none=True),
    "feature_input_hook": Text(none=True),
    "calibration.dataset": PathLike(none=True),
    "calibration.tokens": Int(1),
}

HARVEST_SCHEMA = {
    "base_model": PathLike(),
    "text.source": PathLike(),
    "text.key": Text(),
    "text.hf_config": Text(none=True),
    "text.hf_split": Text(),
    "max_tokens": Int(1),
    "context": Int(2, why=" (BOS + a token)"),
    "batch_size": Int(1),
    "layers": Layers,
    "x_source": Choice("resid", "normalized"),
    "bos": Choice("drop", "keep"),
    "model_dtype": Choice("fp32", "bf16"),
    "dtype": Choice("bfloat16", "float16", "int8"),
    "device": Choice(*DEVICES),
    "threads": Int(1, none=True),
    "out_dir": PathLike(),
    "name": Check(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}", v) is not None,
                  "a file name prefix: letters, digits, '.', '_', '-' (the loader reads only such shard names)"),
    "tokens_per_sample": Int(1),
    "shard_tokens": Int(1),
    "shuffle_buffer": Int(1),
    "scale_tokens": Int(1),
    "seed": Int(0, 2**63 - 1, text="an integer in [0, 2^63)"),
    "dry_run": Bool,
    "merge_timeout": Int(1),
}


def check_schema(cfg: DictConfig, schema: dict[str, Check], extensions: tuple[str, ...] = ("hydra.*",),
                 free_roots: tuple[str, ...] = _FREE_ROOTS):
    """Refuse keys the schema does not list (naming the nearest known key), keys that cannot be
    resolved (`${...}`), required keys that are missing, and values their check rejects."""
    prefixes = {k.rsplit(".", i)[0] for k in schema for i in range(1, k.count(".") + 1)}

    def walk(node, prefix):
        for k in node.keys():
            key = f"{prefix}{k}"
            if not prefix and str(k) in free_roots:
                continue
            if key in schema:
                yield key
            elif key in prefixes:
                child = node._get_node(k)
                if not isinstance(child, DictConfig) or child._is_none() or child._is_missing():
                    _fail(key, _raw(node, k), "a group of keys (" + ", ".join(
                        sorted(s[len(key) + 1:] for s in schema if s.startswith(key + "."))) + ")")
                yield from walk(child, key + ".")
            else:
                near = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"config key '{key}' = {_raw(node, k)!r}: unknown key{hint}. A `+` "
                                  f"override cannot add keys; the extension points are "
                                  f"{', '.join(extensions)} (docs/operations.md)")

    present = set(walk(cfg, ""))
    for key, check in schema.items():
        if key not in present:
            if check.required:
                raise ConfigError(f"config key '{key}' is missing: expected {check.expected}")
            continue
        check(key, _resolved(cfg, key))


# _raw and check_schema read nodes through omegaconf 2.3's Node API (_get_node, _value, _is_none,
# _is_missing): the public API resolves interpolations on access, and a message must show the value as
# typed (e.g. '${nope}') and walk a config whose values may not resolve. Written against omegaconf
# 2.3.1; setup.py only asks >=2.3, so tests/test_config.py covers each path (unknown keys,
# out_dir=${nope}, seed=???, model.loss=3).
def _raw(node, k):
    try:
        v = node._get_node(k)._value()
    except Exception:  # a broken node: show what we can
        return "?"
    return OmegaConf.to_container(v, resolve=False) if isinstance(v, (DictConfig, ListConfig)) else v


def _resolved(cfg, key):
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        v = OmegaConf.select(cfg, key, throw_on_missing=True, throw_on_resolution_failure=True)
        return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
    except MissingMandatoryValue:
        raise ConfigError(f"config key '{key}' = '???': expected a value") from None
    except OmegaConfBaseException as e:
        parent, _, leaf = key.rpartition(".")
        raw = _raw(OmegaConf.select(cfg, parent) if parent else cfg, leaf)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}' = {raw!r}: cannot be resolved ({msg})") from None


# ----------------------------------------------------------------------------------------------------
# Job validators


def validate_model(cfg: DictConfig, prefix: str = "model"):
    """Check a model group at `prefix`: each key (MODEL_SCHEMA) and the keys together."""
    p = prefix + "."
    for key, check in MODEL_SCHEMA.items():
        if check.required or OmegaConf.select(cfg, p + key, throw_on_missing=False) is not None:
            check(p + key, _resolved(cfg, p + key))
    require_positive_int(cfg, p + "n_features")
    require_choice(cfg, p + "activation", ACTIVATIONS)
    if _get(cfg, p + "activation") != "jumprelu":
        require_positive_int(cfg, p + "topk")
        if _get(cfg, p + "topk") > _get(cfg, p + "n_features"):
            _fail(p + "topk", _get(cfg, p + "topk"), f"at most model.n_features={_get(cfg, p + 'n_features')}")


def validate_train(cfg: DictConfig):
    """Check a composed clt-train config; raises ConfigError naming the first bad key."""
    check_schema(cfg, TRAIN_SCHEMA, EXTENSION_POINTS)
    validate_model(cfg)
    steps, budget = _get(cfg, "steps"), _get(cfg, "train_tokens")
    # Exactly one of steps / train_tokens sets the run's length; a silent precedence would train for a
    # length the user did not ask for.
    if (steps is None) == (budget is None):
        if budget is None:
            _fail("steps", None, "a positive integer (or set train_tokens)")
        raise ConfigError(f"config keys 'steps' = {steps!r} and 'train_tokens' = {budget!r}: exactly one of "
                          "them sets the run's length; for a token budget add steps=null")
    if _get(cfg, "deepspeed.zero_stage") == 3 and _get(cfg, "parallel.feature_parallel") != 1:
        _fail("deepspeed.zero_stage", 3, "0, 1 or 2 with feature_parallel > 1 (ZeRO-3 runs over plain data parallel)")
    if _get(cfg, "precision") == "bf16":
        check_zero_stage_precision(cfg, "bf16", "precision=bf16")
    n_features, fp = _get(cfg, "model.n_features"), _get(cfg, "parallel.feature_parallel")
    if n_features % fp:
        _fail("model.n_features", n_features, f"a multiple of parallel.feature_parallel={fp}")
    if _get(cfg, "eval_every") > 0 and _get(cfg, "data.heldout_shards") < 1:
        _fail("eval_every", _get(cfg, "eval_every"), "0 when data.heldout_shards=0 (evaluation reads the "
              "held-out shards)")
    if _get(cfg, "logger.mode") == "online":
        check_wandb_login("logger.mode")
    if _get(cfg, "overwrite") and _get(cfg, "resume") not in (False, None):
        _fail("overwrite", True, "false with resume set (resume continues the run in out_dir; overwrite replaces it)")


def validate_runtime(cfg: DictConfig, world_size: int, cuda_available: bool):
    """Checks that need the launched job: call once the launcher's environment is known (the world size
    from RANK/WORLD_SIZE or SLURM_*), before a process group or a device is set up."""
    fp = _get(cfg, "parallel.feature_parallel")
    if world_size % fp:
        raise ConfigError(f"config key 'parallel.feature_parallel' = {fp}: expected a divisor of the world size "
                          f"{world_size} (world = data_parallel x feature_parallel); launch a multiple of {fp} "
                          f"processes, e.g. torchrun --nproc_per_node {fp}")
    device = _get(cfg, "device")
    if device == "cuda" and not cuda_available:
        _fail("device", device, "auto or cpu: torch sees no CUDA device here")
    if _get(cfg, "parallel.backend") == "nccl" and not (cuda_available and device != "cpu"):
        _fail("parallel.backend", "nccl", "auto or gloo: NCCL needs CUDA devices")
    on_gpu = cuda_available and device != "cpu"
    if _get(cfg, "precision") == "auto":
        check_zero_stage_precision(cfg, resolve_precision("auto", "cuda" if on_gpu else "cpu"),
                                   "precision=auto on CUDA")
    if _get(cfg, "kernels") == "triton" and not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        _fail("kernels", "triton", "auto, dense or torch_sparse without a CUDA device (triton runs on CPU only "
              "under TRITON_INTERPRET=1, for tests)")
    budget = _get(cfg, "train_tokens")
    if budget is not None:
        dp = world_size // fp
        per_step = _get(cfg, "batch_tokens") * _get(cfg, "grad_accum") * dp
        if budget < per_step:
            _fail("train_tokens", budget, f"at least one step's tokens, batch_tokens x grad_accum x data_parallel "
                  f"= {per_step}")


def check_zero_stage_precision(cfg: DictConfig, precision: str, why: str):
    """ZeRO stage 0 is refused in bf16. There DeepSpeed 0.19 wraps the optimizer in FP16_UnfusedOptimizer
    (engine._configure_fp16_optimizer), whose constructor runs one optimizer step on zero gradients
    (initialize_optimizer_states): torch Adam counts it, so its bias correction runs one step behind and
    the first real update is 0.74 x lr instead of lr; gradients also accumulate in bf16. ZeRO-1 takes the
    same memory as stage 0 at data_parallel=1 and has neither problem."""
    if precision == "bf16" and _get(cfg, "deepspeed.zero_stage") == 0:
        raise ConfigError(f"config key 'deepspeed.zero_stage' = 0 with {why}: DeepSpeed's stage-0 bf16 optimizer "
                          "starts Adam one step off (the first update is 0.74 x lr); use deepspeed=zero1 (the "
                          "same memory at data_parallel=1) or precision=fp32")


def resolve_steps(cfg: DictConfig, data_parallel: int) -> int:
    """The run's optimizer steps: `steps`, or the fewest steps that consume `train_tokens` (the last step
    may pass the budget by less than one step's tokens)."""
    if _get(cfg, "train_tokens") is None:
        return int(cfg.steps)
    per_step = int(cfg.batch_tokens) * int(cfg.grad_accum) * int(data_parallel)
    return max(1, -(-int(cfg.train_tokens) // per_step))


def resolve_precision(value: str, device_type: str) -> str:
    """precision=auto: bf16 weights/activations (fp32 master weights) on CUDA, fp32 on CPU."""
    if value not in PRECISIONS:
        _fail("precision", value, f"one of {list(PRECISIONS)}")
    if value != "auto":
        return value
    return "bf16" if device_type == "cuda" else "fp32"


def validate_eval(cfg: DictConfig):
    """Keys and values of a clt-eval config (configs/eval.yaml); run before anything is read."""
    check_schema(cfg, EVAL_SCHEMA)
    if not _get(cfg, "model_dir") and not _get(cfg, "frontier") and not _get(cfg, "sweep_dir"):
        raise ConfigError("config key 'model_dir' = None: expected the folder of a trained CLT (model.safetensors "
                          "+ model.json) or a clt-train run folder, e.g. clt-eval model_dir=runs/clt (or "
                          "sweep_dir=runs/SWEEP for every run of a sweep)")
    if _get(cfg, "logger.mode") == "online":
        check_wandb_login("logger.mode")


def validate_export(cfg: DictConfig):
    """Keys and values of a clt-export config (configs/export.yaml)."""
    check_schema(cfg, EXPORT_SCHEMA)
    if not _get(cfg, "model_dir"):
        raise ConfigError("config key 'model_dir' = None: expected the folder of a trained CLT (model.safetensors "
                          "+ model.json) or a clt-train run folder, e.g. clt-export model_dir=runs/clt")


def validate_harvest_config(cfg: DictConfig):
    """Keys and values of a clt-harvest config (configs/harvest.yaml); harvest.validate_harvest adds the
    checks between keys."""
    check_schema(cfg, HARVEST_SCHEMA)


# ----------------------------------------------------------------------------------------------------
# W&B credentials


def wandb_credentials() -> str | None:
    """Where W&B would find an API key (its name), or None. Mirrors wandb 0.2x-0.3x's lookup: the
    WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE variables, then a .netrc entry ($NETRC, ~/.netrc, ~/_netrc)
    for the host of WANDB_BASE_URL (default https://api.wandb.ai). wandb's own settings file is not
    read: a key kept only there is reported missing (the message says how to pass it)."""
    import netrc
    from urllib.parse import urlsplit

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return var
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    if os.environ.get("NETRC"):
        candidates = [Path(os.environ["NETRC"]).expanduser()]
    else:
        candidates = [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            creds = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if creds and creds[2]:
            return str(path)
    return None


def check_wandb_login(key: str):
    if wandb_credentials() is None:
        raise ConfigError(f"config key '{key}' = 'online': no W&B API key found (WANDB_API_KEY, or a ~/.netrc "
                          f"entry written by `wandb login`); log in, or use {key}=offline and `wandb sync` the "
                          "run folder later")


# ----------------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_overrides(cfg: DictConfig, precision: str) -> dict:
    """Entries to merge into the DeepSpeed config the trainer builds (trainer.deepspeed_config).

    ZeRO stage 0 with fp32: DeepSpeed 0.19's engine clips with deepspeed.runtime.utils.clip_grad_norm_
    inside DeepSpeedEngine._take_model_step and throws the norm away, so get_global_grad_norm() is None
    (logged as nan), and its clip arithmetic differs from torch's by rounding. There the trainer clips in
    the client optimizer instead (train/grad_clip.py: ClippedAdam, which DeepSpeed reads the norm from),
    so DeepSpeed's own clipping is turned off. `precision` is the resolved one (resolve_precision); stage 0
    in bf16 is refused (check_zero_stage_precision)."""
    if int(cfg.deepspeed.zero_stage) == 0 and precision == "fp32":
        return {"gradient_clipping": 0.0}
    return {}


def clips_in_optimizer(cfg: DictConfig, precision: str) -> bool:
    """True where the client optimizer must clip (see deepspeed_overrides)."""
    return "gradient_clipping" in deepspeed_overrides(cfg, precision)


# ----------------------------------------------------------------------------------------------------
# Model config


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
