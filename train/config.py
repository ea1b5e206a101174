"""Settings for every cltrain command: Hydra composes configs/, and each command turns its config into
one typed settings object at its entry (TrainSettings, EvalSettings, ExportSettings, HarvestSettings
`.from_config`), checked once, then passed down; nothing below re-validates.

Every key a command reads is a field of its settings with its check, so a key that is not one (a typo,
even one added with `+`) is refused, and a bad value stops the command with a ConfigError that names the
key and the value, before anything is built or written. The documented extension points are listed in
EXTENSION_POINTS (and in configs/train.yaml, docs/operations.md). Checks that need the launched job
(world size, GPU) are in `TrainSettings.check_runtime`, which the trainer calls once the launcher's
environment is known, before any process group or device is set up.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from cltrain.errors import ConfigError
from cltrain.names import NAME_KEYS, base_name, clean

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


def _fail(key: str, value, expected: str):
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
# Several dictionaries per data pass (train/trainer.py): null, or a list of overrides of model.* / optim.*
# keys, one mapping per dictionary, e.g. [{model.n_features: 1024}, {model.n_features: 2048}].
DICTIONARY_PREFIXES = ("model.", "optim.")
Dictionaries = Check(lambda v: v is None or (isinstance(v, list) and len(v) >= 1 and all(
    isinstance(d, dict) and all(isinstance(k, str) and k.startswith(DICTIONARY_PREFIXES) for k in d) for d in v)),
    "null or a non-empty list of mappings of model.* / optim.* keys, e.g. [{model.n_features: 1024}]")
Layers = Check(lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)
                                       and v[0] <= v[1]), "null or [first, last] with 0 <= first <= last")

ShardPrefix = Check(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}", v) is not None,
                    "a file name prefix: letters, digits, '.', '_', '-' (the loader reads only such shard names)")


def check_schema(cfg: DictConfig, schema: dict[str, Check], extensions: tuple[str, ...] = ("hydra.*",),
                 free_roots: tuple[str, ...] = _FREE_ROOTS):
    """Refuse keys the schema does not list (naming the nearest known key), keys that cannot be
    resolved (`${...}`) and required keys that are missing (values: when the settings are made)."""
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
        if key in present:
            _resolved(cfg, key)  # its value is checked when the settings are made
        elif check.required:
            raise ConfigError(f"config key '{key}' is missing: expected {check.expected}")


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


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
KERNELS = ("auto", "dense", "torch_sparse", "triton")  # cltrain.kernels.IMPLEMENTATIONS plus auto
LOGGER_MODES = ("offline", "online", "disabled")


# ----------------------------------------------------------------------------------------------------
# Typed settings: one object per command, built from the composed config and checked once, at the
# command's entry (`from_config`), then passed down. Dataclasses, not pydantic: no new dependency, and the
# checks above keep the messages every command gives (key, value as typed, what was expected).
#
# A field is a config key: `setting(check, default)`. The defaults here are the code's only defaults;
# configs/*.yaml repeat them for the reader, and tests/test_config.py checks that both agree. A settings
# object checks its values when it is made (__post_init__), whether from a config or in Python (the demo,
# tests), so an invalid one cannot exist; `check` holds the rules between keys.


def setting(check: Check, default):
    meta = {"check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls, default_factory=None):
    return field(default_factory=default_factory or cls, metadata={"group": cls})


@dataclass(frozen=True)
class Settings:
    PREFIX: ClassVar[str] = ""  # where this group sits in its command's config ("model.", "model.loss.")

    def __post_init__(self):
        for f in fields(self):
            if "check" in f.metadata:
                f.metadata["check"](self.PREFIX + f.name, getattr(self, f.name))
        self.check()

    def check(self):
        """The rules between keys (each key's own check has run)."""

    @classmethod
    def schema(cls) -> dict[str, Check]:
        """Every key of this group, dotted from the command's root, with its check."""
        out = {}
        for f in fields(cls):
            if "check" in f.metadata:
                out[cls.PREFIX + f.name] = f.metadata["check"]
            else:
                out.update(f.metadata["group"].schema())
        return out

    @classmethod
    def from_node(cls, cfg: DictConfig):
        """Build from a composed config whose keys check_schema has checked (none unknown or unresolvable)."""
        kwargs = {}
        for f in fields(cls):
            if "check" not in f.metadata:
                kwargs[f.name] = f.metadata["group"].from_node(cfg)
            elif OmegaConf.select(cfg, cls.PREFIX + f.name, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
                kwargs[f.name] = _resolved(cfg, cls.PREFIX + f.name)
        return cls(**kwargs)

    @classmethod
    def defaults(cls) -> dict:
        """The code's defaults as a nested dict, without making (and so checking) an object: a command's
        defaults need not be a runnable command (clt-eval has no default model_dir)."""
        out = {}
        for f in fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif "group" in f.metadata:
                made = f.default_factory()
                out[f.name] = made.to_dict() if made is not None else None
            else:
                out[f.name] = f.default_factory()
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))

    def select(self, dotted: str):
        value = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value


class CommandSettings(Settings):
    EXTENSIONS: ClassVar[tuple[str, ...]] = ("hydra.*",)

    @classmethod
    def from_config(cls, cfg):
        """The command's settings from its composed config: unknown, unresolvable or missing keys and bad
        values raise ConfigError naming the key. Given settings already, returns them unchanged."""
        if isinstance(cfg, cls):
            return cfg
        check_schema(cfg, cls.schema(), cls.EXTENSIONS)
        return cls.from_node(cfg)


_ABSENT = object()


@dataclass(frozen=True)
class LossSettings(Settings):
    PREFIX: ClassVar[str] = "model.loss."
    sparsity_c: float = setting(Num(0), 4.0)
    lambda_s: float = setting(Num(0), 1.0)
    lambda_s_ramp_fraction: float = setting(Num(0, 1), 1.0)
    lambda_p: float = setting(Num(0), 3.0e-6)
    auxk: float = setting(Num(0), 0.0)
    auxk_k: int = setting(Int(1), 512)


@dataclass(frozen=True)
class ModelSettings(Settings):
    PREFIX: ClassVar[str] = "model."
    n_layers: int | None = setting(Int(1, none=True), None)
    d_model: int | None = setting(Int(1, none=True), None)
    n_features: int = setting(Int(1), 4096)
    per_layer: bool = setting(Bool, False)
    activation: str = setting(Choice(*ACTIVATIONS), "jumprelu")
    topk: int = setting(Int(0), 0)
    bandwidth: float = setting(Num(0, lo_open=True), 2.0)
    threshold_init: float = setting(Num(0, lo_open=True), 0.03)
    threshold_calibration_rate: float | None = setting(Num(0, 1, lo_open=True, none=True), None)
    straight_through_to_preact: bool = setting(Bool, False)
    loss: LossSettings = group(LossSettings)

    def check(self):
        if self.activation != "jumprelu":
            if self.topk <= 0:
                _fail(self.PREFIX + "topk", self.topk, "a positive integer")
            if self.topk > self.n_features:
                _fail(self.PREFIX + "topk", self.topk, f"at most model.n_features={self.n_features}")

    def clt_config(self, n_layers: int, d_model: int) -> CLTConfig:
        """The CLTConfig for this model on a dataset of n_layers x d_model (which model.* may pin)."""
        for name, found in (("n_layers", n_layers), ("d_model", d_model)):
            want = getattr(self, name)
            if want is not None and want != found:
                raise ConfigError(f"config key 'model.{name}' = {want!r} but the dataset has {name}={found}")
        return CLTConfig(n_layers=n_layers, d_model=d_model, n_features=self.n_features, per_layer=self.per_layer,
                         activation=self.activation, bandwidth=float(self.bandwidth),
                         threshold_init=float(self.threshold_init),
                         straight_through_to_preact=self.straight_through_to_preact, topk=self.topk)

    def loss_weights(self, lambda_s: float) -> LossWeights:
        loss = self.loss
        return LossWeights(sparsity=lambda_s, preact=float(loss.lambda_p), sparsity_c=float(loss.sparsity_c),
                           auxk=float(loss.auxk), auxk_k=int(loss.auxk_k))


@dataclass(frozen=True)
class LiveTextSettings(Settings):
    PREFIX: ClassVar[str] = "data.live.text."
    source: str = setting(PathLike().optional(), "builtin")
    key: str = setting(Text().optional(), "text")
    hf_config: str | None = setting(Text(none=True).optional(), None)
    hf_split: str = setting(Text().optional(), "train")


@dataclass(frozen=True)
class LiveSettings(Settings):
    """Live activations (data=live, train/live.py): the base model runs over text while the CLT trains.
    The keys clt-harvest has (base_model, text, context, ...) mean what they mean there."""
    PREFIX: ClassVar[str] = "data.live."
    base_model: str = setting(PathLike().optional(), "smollm2")
    text: LiveTextSettings = group(LiveTextSettings)
    context: int = setting(Int(2, why=" (BOS + a token)").optional(), 128)
    batch_size: int = setting(Int(1).optional(), 8)
    layers: list | None = setting(Layers.optional(), None)
    x_source: str = setting(Choice("resid", "normalized").optional(), "resid")
    bos: str = setting(Choice("drop", "keep").optional(), "drop")
    model_dtype: str = setting(Choice("fp32", "bf16").optional(), "fp32")
    dtype: str = setting(Choice("bfloat16", "float16").optional(), "bfloat16")
    scale_tokens: int = setting(Int(1).optional(), 4096)
    threads: int | None = setting(Int(1, none=True).optional(), None)
    write_to: str | None = setting(PathLike(none=True).optional(), None)
    write_dtype: str | None = setting(Choice("bfloat16", "float16", "int8", None).optional(), None)
    name: str = setting(ShardPrefix.optional(), "live")


@dataclass(frozen=True)
class DataSettings(Settings):
    PREFIX: ClassVar[str] = "data."
    source: str = setting(Choice("shards", "live").optional(), "shards")
    path: str | None = setting(PathLike(none=True), None)
    heldout_shards: int = setting(Int(0), 1)
    shuffle_buffer: int = setting(Int(1, why=" (tokens; the loader's token-level shuffle cannot be turned off)"), 16384)
    num_workers: int = setting(Int(0), 1)
    on_error: str = setting(Choice("raise", "skip"), "raise")
    timeout: float = setting(Num(0, lo_open=True), 600)
    verify: bool = setting(Bool, True)
    verify_upfront: bool = setting(Bool, True)
    allow_change_on_resume: bool = setting(Bool, False)
    live: LiveSettings = group(LiveSettings)

    def check(self):
        if self.source == "live" and self.path is not None:
            _fail("data.path", self.path, "null with data.source=live (live activations come from "
                  "data.live.base_model; a dataset folder is data=default)")


@dataclass(frozen=True)
class OptimSettings(Settings):
    PREFIX: ClassVar[str] = "optim."
    lr: float = setting(Num(0, lo_open=True), 2.0e-4)
    betas: list = setting(Betas, [0.9, 0.999])
    eps: float = setting(Num(0, lo_open=True), 1.0e-8)
    weight_decay: float = setting(Num(0), 0.0)
    grad_clip: float = setting(Num(0), 1.0)
    warmup_steps: int = setting(Int(0), 0)
    decay_fraction: float = setting(Num(0, 1), 0.2)
    fused: str | bool = setting(Fused.optional(), "auto")


@dataclass(frozen=True)
class ParallelSettings(Settings):
    PREFIX: ClassVar[str] = "parallel."
    feature_parallel: int = setting(Int(1), 1)
    backend: str = setting(Choice("auto", "gloo", "nccl"), "auto")


@dataclass(frozen=True)
class DeepSpeedSettings(Settings):
    PREFIX: ClassVar[str] = "deepspeed."
    zero_stage: int = setting(Choice(0, 1, 2, 3), 1)
    overlap_comm: bool = setting(Bool, False)
    reduce_bucket_size: int | None = setting(Int(1, none=True).optional(), None)
    allgather_bucket_size: int | None = setting(Int(1, none=True).optional(), None)
    stage3_param_persistence_threshold: int | None = setting(Int(0, none=True).optional(), None)


@dataclass(frozen=True)
class LoggerSettings(Settings):
    PREFIX: ClassVar[str] = "logger."
    mode: str = setting(Choice(*LOGGER_MODES), "offline")
    project: str = setting(Text(), "cltrain")
    entity: str | None = setting(Text(none=True), None)
    run_name: str = setting(PathLike(), "clt")
    group: str | None = setting(Text(none=True), None)
    tags: list = setting(TextList(), [])

    def check(self):
        if self.mode == "online":
            check_wandb_login(self.PREFIX + "mode")


@dataclass(frozen=True)
class TrainSettings(CommandSettings):
    """clt-train (configs/train.yaml and its groups)."""
    EXTENSIONS: ClassVar[tuple[str, ...]] = EXTENSION_POINTS
    seed: int = setting(Int(0, 2**63 - 1, text="an integer in [0, 2^63)"), 0)
    steps: int | None = setting(Int(1, none=True), 1000)
    train_tokens: int | None = setting(Int(1, none=True), None)
    batch_tokens: int = setting(Int(1), 1024)
    grad_accum: int = setting(Int(1), 1)
    precision: str = setting(Choice(*PRECISIONS), "auto")
    device: str = setting(Choice(*DEVICES), "auto")
    out_dir: str = setting(PathLike(), "runs/clt")  # configs/train.yaml: runs/${logger.run_name}
    checkpoint_every: int = setting(Int(1), 500)
    resume: bool | str = setting(Resume, False)
    overwrite: bool = setting(Bool, False)
    stop_at_step: int | None = setting(Int(0, none=True), None)
    log_every: int = setting(Int(1), 10)
    eval_every: int = setting(Int(0, why=" (steps; 0: off)"), 0)
    eval_tokens: int = setting(Int(1), 65536)
    keep_checkpoints: int = setting(Int(0, why=" (0: keep all)"), 3)
    dead_after_tokens: int = setting(Int(1), 10_000_000)
    dense_fire_rate: float = setting(Num(0, 1, lo_open=True), 0.1)
    kernels: str = setting(Choice(*KERNELS), "auto")
    progress: bool = setting(Bool, True)
    check_memory: bool = setting(Bool, True)
    dictionaries: list | None = setting(Dictionaries, None)
    model: ModelSettings = group(ModelSettings)
    data: DataSettings = group(DataSettings)
    optim: OptimSettings = group(OptimSettings)
    parallel: ParallelSettings = group(ParallelSettings)
    deepspeed: DeepSpeedSettings = group(DeepSpeedSettings)
    logger: LoggerSettings = group(LoggerSettings)

    def check(self):
        # Exactly one of steps / train_tokens sets the run's length; a silent precedence would train for a
        # length the user did not ask for.
        if (self.steps is None) == (self.train_tokens is None):
            if self.train_tokens is None:
                _fail("steps", None, "a positive integer (or set train_tokens)")
            raise ConfigError(f"config keys 'steps' = {self.steps!r} and 'train_tokens' = {self.train_tokens!r}: "
                              "exactly one of them sets the run's length; for a token budget add steps=null")
        fp = self.parallel.feature_parallel
        if self.deepspeed.zero_stage == 3 and fp != 1:
            _fail("deepspeed.zero_stage", 3, "0, 1 or 2 with feature_parallel > 1 (ZeRO-3 runs over plain data "
                  "parallel)")
        if self.precision == "bf16":
            self.check_zero_stage_precision("bf16", "precision=bf16")
        if self.model.n_features % fp:
            _fail("model.n_features", self.model.n_features, f"a multiple of parallel.feature_parallel={fp}")
        if self.eval_every > 0 and self.data.source == "live":
            _fail("eval_every", self.eval_every, "0 with data=live (periodic evaluation reads held-out shards; "
                  "evaluate a live run's model with clt-eval on shards, e.g. those data.live.write_to wrote)")
        if self.eval_every > 0 and self.data.heldout_shards < 1:
            _fail("eval_every", self.eval_every, "0 when data.heldout_shards=0 (evaluation reads the held-out "
                  "shards)")
        if self.overwrite and self.resume not in (False, None):
            _fail("overwrite", True, "false with resume set (resume continues the run in out_dir; overwrite "
                  "replaces it)")

    def check_runtime(self, world_size: int, cuda_available: bool):
        """Checks that need the launched job: call once the launcher's environment is known (the world size
        from RANK/WORLD_SIZE or SLURM_*), before a process group or a device is set up."""
        fp = self.parallel.feature_parallel
        if world_size % fp:
            raise ConfigError(f"config key 'parallel.feature_parallel' = {fp}: expected a divisor of the world "
                              f"size {world_size} (world = data_parallel x feature_parallel); launch a multiple of "
                              f"{fp} processes, e.g. torchrun --nproc_per_node {fp}")
        device = self.device
        if device == "cuda" and not cuda_available:
            _fail("device", device, "auto or cpu: torch sees no CUDA device here")
        if self.parallel.backend == "nccl" and not (cuda_available and device != "cpu"):
            _fail("parallel.backend", "nccl", "auto or gloo: NCCL needs CUDA devices")
        on_gpu = cuda_available and device != "cpu"
        if self.precision == "auto":
            self.check_zero_stage_precision(resolve_precision("auto", "cuda" if on_gpu else "cpu"),
                                            "precision=auto on CUDA")
        if self.kernels == "triton" and not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
            _fail("kernels", "triton", "auto, dense or torch_sparse without a CUDA device (triton runs on CPU "
                  "only under TRITON_INTERPRET=1, for tests)")
        if self.train_tokens is not None:
            per_step = self.batch_tokens * self.grad_accum * (world_size // fp)
            if self.train_tokens < per_step:
                _fail("train_tokens", self.train_tokens, f"at least one step's tokens, batch_tokens x grad_accum "
                      f"x data_parallel = {per_step}")

    def check_zero_stage_precision(self, precision: str, why: str):
        """ZeRO stage 0 is refused in bf16. There DeepSpeed 0.19 wraps the optimizer in FP16_UnfusedOptimizer
        (engine._configure_fp16_optimizer), whose constructor runs one optimizer step on zero gradients
        (initialize_optimizer_states): torch Adam counts it, so its bias correction runs one step behind and
        the first real update is 0.74 x lr instead of lr; gradients also accumulate in bf16. ZeRO-1 takes
        the same memory as stage 0 at data_parallel=1 and has neither problem."""
        if precision == "bf16" and self.deepspeed.zero_stage == 0:
            raise ConfigError(f"config key 'deepspeed.zero_stage' = 0 with {why}: DeepSpeed's stage-0 bf16 "
                              "optimizer starts Adam one step off (the first update is 0.74 x lr); use "
                              "deepspeed=zero1 (the same memory at data_parallel=1) or precision=fp32")

    def resolve_steps(self, data_parallel: int) -> int:
        """The run's optimizer steps: `steps`, or the fewest steps that consume `train_tokens` (the last
        step may pass the budget by less than one step's tokens)."""
        if self.train_tokens is None:
            return self.steps
        per_step = self.batch_tokens * self.grad_accum * data_parallel
        return max(1, -(-self.train_tokens // per_step))

    def dictionary_settings(self) -> list["TrainSettings"]:
        """The dictionaries this run trains on one batch stream: itself (K = 1), or one per entry of
        `dictionaries`, each the base settings with that entry's model.* / optim.* overrides, in
        out_dir/<its run name> with logger.group the run's."""
        if not self.dictionaries:
            return [self]
        group_name = self.logger.group or str(self.logger.run_name)
        out, names = [], {}
        for i, overrides in enumerate(self.dictionaries):
            try:
                s = self.with_overrides(overrides)
            except ConfigError as e:
                raise ConfigError(f"dictionaries[{i}] {overrides}: {e}") from None
            name = dictionary_name(s.model, overrides)
            if name in names:
                raise ConfigError(f"config key 'dictionaries': entries {names[name]} and {i} are the same run "
                                  f"({name})")
            names[name] = i
            out.append(dataclasses.replace(
                s, out_dir=str(Path(str(self.out_dir)) / name),
                logger=dataclasses.replace(s.logger, run_name=name, group=group_name)))
        return out

    def with_overrides(self, overrides: dict) -> "TrainSettings":
        """These settings with dotted model.* / optim.* keys replaced (each value checked)."""
        base = self.to_dict()
        base["dictionaries"] = None
        for dotted, value in overrides.items():
            node, *path = dotted.split(".")
            target = base[node]
            for part in path[:-1]:
                if not isinstance(target.get(part), dict):
                    raise ConfigError(f"config key '{dotted}': unknown key")
                target = target[part]
            if path[-1] not in target:
                raise ConfigError(f"config key '{dotted}' = {value!r}: unknown key")
            target[path[-1]] = value
        return TrainSettings.from_config(OmegaConf.create(base))


def dictionary_name(model: ModelSettings, overrides: dict) -> str:
    """A dictionary's run name: the base name from its model, plus every other overridden key."""
    name = base_name(model.per_layer, model.n_features, model.loss.lambda_s, model.activation, model.topk)
    extra = [f"{k.split('.')[-1]}{clean(v)}" for k, v in overrides.items() if k not in NAME_KEYS]
    return "-".join([name] + sorted(extra))


def resolve_precision(value: str, device_type: str) -> str:
    """precision=auto: bf16 weights/activations (fp32 master weights) on CUDA, fp32 on CPU."""
    if value not in PRECISIONS:
        _fail("precision", value, f"one of {list(PRECISIONS)}")
    if value != "auto":
        return value
    return "bf16" if device_type == "cuda" else "fp32"


def missing_model_dir(command: str, alternative: str = "") -> ConfigError:
    return ConfigError(f"config key 'model_dir' = None: expected the folder of a trained CLT (model.safetensors + "
                       f"model.json) or a clt-train run folder, e.g. {command} model_dir=runs/clt{alternative}")


@dataclass(frozen=True)
class ReplacementSettings(Settings):
    PREFIX: ClassVar[str] = "replacement."
    enabled: bool = setting(Bool, True)
    model: str | None = setting(PathLike(none=True), None)
    text: str | None = setting(PathLike(none=True), None)
    skip_harvested: bool = setting(Bool, True)
    skip_documents: int = setting(Int(0), 0)
    n_sequences: int = setting(Int(1), 32)
    seq_len: int = setting(Int(1), 128)
    batch_size: int = setting(Int(1), 8)
    skip_bos: bool = setting(Bool, True)


@dataclass(frozen=True)
class GraphSettings(Settings):
    """Attribution graphs through circuit-tracer (configs/eval.yaml's `graphs` block; train/graphs.py)."""
    PREFIX: ClassVar[str] = "graphs."
    enabled: bool = setting(Bool, False)
    prompts: str = setting(PathLike(), "builtin")
    n_prompts: int = setting(Int(1), 4)
    heldout_tokens: int = setting(Int(2, why=" (BOS + a token)"), 16)
    model: str | None = setting(PathLike(none=True), None)
    export: str | None = setting(PathLike(none=True), None)
    max_feature_nodes: int | None = setting(Int(1, none=True), 1000)
    max_n_logits: int = setting(Int(1), 5)
    desired_logit_prob: float = setting(Num(0, 1, lo_open=True), 0.9)
    batch_size: int = setting(Int(1), 64)
    save: bool = setting(Bool, True)
    node_threshold: float = setting(Num(0, 1, lo_open=True), 0.8)
    edge_threshold: float = setting(Num(0, 1, lo_open=True), 0.98)


@dataclass(frozen=True)
class FeatureSettings(Settings):
    """Feature pages (configs/eval.yaml's `features` block; train/features.py)."""
    PREFIX: ClassVar[str] = "features."
    enabled: bool = setting(Bool, False)
    text: str | None = setting(PathLike(none=True), None)
    skip_documents: int = setting(Int(0), 0)
    n_contexts: int = setting(Int(1), 512)
    context: int = setting(Int(2, why=" (BOS + a token)"), 64)
    batch_size: int = setting(Int(1), 8)
    top_examples: int = setting(Int(1), 16)
    sampled_examples: int = setting(Int(0), 20)
    quantiles: int = setting(Int(1), 5)
    before: int = setting(Int(0), 16)
    after: int = setting(Int(0), 8)
    n_logits: int = setting(Int(1), 10)
    histogram_bins: int = setting(Int(2), 50)
    json: bool = setting(Bool, True)


@dataclass(frozen=True)
class CircuitSettings(Settings):
    """Global weights and perturbation checks (configs/eval.yaml's `circuits` block; train/circuits.py,
    train/faithfulness.py)."""
    PREFIX: ClassVar[str] = "circuits."
    enabled: bool = setting(Bool, False)
    candidates: int = setting(Int(1), 32)
    show: int = setting(Int(1), 10)
    check_nodes: int = setting(Int(0), 8)
    ablate: int = setting(Int(0), 10)


@dataclass(frozen=True)
class EvalSettings(CommandSettings):
    """clt-eval (configs/eval.yaml)."""
    sweep_dir: str | None = setting(PathLike(none=True), None)
    model_dir: str | None = setting(PathLike(none=True), None)
    out_dir: str | None = setting(PathLike(none=True), None)
    dataset: str | None = setting(PathLike(none=True), None)
    split: str = setting(Choice("heldout", "all"), "heldout")
    heldout_shards: int = setting(Int(1), 1)
    max_tokens: int | None = setting(Int(1, none=True), 65536)
    batch_tokens: int = setting(Int(1), 4096)
    dense_threshold: float = setting(Num(0, 1, lo_open=True), 0.1)
    device: str = setting(Choice(*DEVICES), "auto")
    progress: bool = setting(Bool, True)
    frontier: list | None = setting(TextList(none=True), None)
    replacement: ReplacementSettings = group(ReplacementSettings)
    graphs: GraphSettings = group(GraphSettings)
    features: FeatureSettings = group(FeatureSettings)
    circuits: CircuitSettings = group(CircuitSettings)
    logger: LoggerSettings = group(LoggerSettings, lambda: LoggerSettings(run_name="eval"))

    def check(self):
        if not self.model_dir and not self.frontier and not self.sweep_dir:
            raise missing_model_dir("clt-eval", " (or sweep_dir=runs/SWEEP for every run of a sweep)")
        if self.circuits.enabled and not self.features.enabled:
            raise ConfigError("config key 'circuits.enabled' = true needs features.enabled=true: the global "
                              "weights' co-activation statistics come from the feature pages' pass")


@dataclass(frozen=True)
class CalibrationSettings(Settings):
    PREFIX: ClassVar[str] = "calibration."
    dataset: str | None = setting(PathLike(none=True), None)
    tokens: int = setting(Int(1), 65536)


@dataclass(frozen=True)
class ExportSettings(CommandSettings):
    """clt-export (configs/export.yaml)."""
    model_dir: str | None = setting(PathLike(none=True), None)
    out_dir: str | None = setting(PathLike(none=True), None)
    overwrite: bool = setting(Bool, False)
    dtype: str = setting(Choice("float32", "bfloat16", "float16"), "float32")
    model_name: str | None = setting(Text(none=True), None)
    feature_input_hook: str | None = setting(Text(none=True), None)
    features: str | None = setting(PathLike(none=True), None)
    calibration: CalibrationSettings = group(CalibrationSettings)

    def check(self):
        if not self.model_dir:
            raise missing_model_dir("clt-export")


@dataclass(frozen=True)
class TextSettings(Settings):
    PREFIX: ClassVar[str] = "text."
    source: str = setting(PathLike(), "builtin")
    key: str = setting(Text(), "text")
    hf_config: str | None = setting(Text(none=True), None)
    hf_split: str = setting(Text(), "train")


@dataclass(frozen=True)
class HarvestSettings(CommandSettings):
    """clt-harvest (configs/harvest.yaml)."""
    base_model: str = setting(PathLike(), "smollm2")
    text: TextSettings = group(TextSettings)
    max_tokens: int = setting(Int(1), 1_000_000)
    context: int = setting(Int(2, why=" (BOS + a token)"), 128)
    batch_size: int = setting(Int(1), 8)
    layers: list | None = setting(Layers, None)
    x_source: str = setting(Choice("resid", "normalized"), "resid")
    bos: str = setting(Choice("drop", "keep"), "drop")
    model_dtype: str = setting(Choice("fp32", "bf16"), "fp32")
    dtype: str = setting(Choice("bfloat16", "float16", "int8"), "bfloat16")
    device: str = setting(Choice(*DEVICES), "auto")
    threads: int | None = setting(Int(1, none=True), None)
    out_dir: str = setting(PathLike(), "activations/acts")  # configs/harvest.yaml: activations/${name}
    name: str = setting(ShardPrefix, "acts")
    tokens_per_sample: int = setting(Int(1), 128)
    shard_tokens: int = setting(Int(1), 8192)
    shuffle_buffer: int = setting(Int(1), 32768)
    scale_tokens: int = setting(Int(1), 4096)
    seed: int = setting(Int(0, 2**63 - 1, text="an integer in [0, 2^63)"), 0)
    dry_run: bool = setting(Bool, False)
    merge_timeout: int = setting(Int(1), 3600)

    def check(self):
        if self.shard_tokens % self.tokens_per_sample:
            raise ConfigError(f"config key 'shard_tokens' = {self.shard_tokens}: expected a multiple of "
                              f"tokens_per_sample={self.tokens_per_sample}")
        if self.shuffle_buffer < self.shard_tokens:
            raise ConfigError(f"config key 'shuffle_buffer' = {self.shuffle_buffer}: expected at least "
                              f"shard_tokens={self.shard_tokens} (a shard is cut from one shuffled buffer)")
