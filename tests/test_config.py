"""The Hydra config tree: every group composes, defaults follow docs/design.md section 1, bad values are named,
unknown keys are refused, and the console script turns each into one line and exit code 2."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cltrain.train.config import (CONFIG_DIR, CONFIG_GROUPS, EvalSettings, ExportSettings, HarvestSettings,
                                  TrainSettings, compose, resolve_precision)
from cltrain.errors import ConfigError


def group_options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_exists():
    for group in CONFIG_GROUPS:
        assert group_options(group), f"configs/{group}/ has no options"


@pytest.mark.parametrize("group", [g for g in CONFIG_GROUPS if g != "sweep"])
def test_every_option_of_every_group_composes_and_validates(group):
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if group == "deepspeed" and option == "zero3":
            overrides.append("parallel=single")
        cfg = compose("train", overrides)
        TrainSettings.from_config(cfg)


def test_sweep_composes():
    cfg = compose("train", ["+sweep=dict_sizes"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["model.n_features"] == "1024,2048,4096"
    assert cfg.hydra.sweeper.params.model == "clt,plt"


def test_defaults_follow_the_design():
    cfg = compose("train")
    TrainSettings.from_config(cfg)
    assert cfg.model.loss.sparsity_c == 4.0
    assert cfg.model.bandwidth == 2.0
    assert cfg.model.loss.lambda_p == 3e-6
    assert cfg.model.threshold_init == 0.03
    assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.weight_decay == 0.0
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.decay_fraction == 0.2
    assert cfg.model.per_layer is False
    assert compose("train", ["model=plt"]).model.per_layer is True  # PLT is one switch away


@pytest.mark.parametrize("override,key", [
    ("model.n_features=-3", "model.n_features"),
    ("model.activation=softplus", "model.activation"),
    ("model.bandwidth=0", "model.bandwidth"),
    ("model.bandwidth=-1.5", "model.bandwidth"),
    ("model.loss.lambda_p=-1", "model.loss.lambda_p"),
    ("optim.lr=0", "optim.lr"),
    ("precision=fp8", "precision"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("parallel.feature_parallel=3", "model.n_features"),  # 4096 features do not split 3 ways
])
def test_bad_value_names_key_and_value(override, key):
    cfg = compose("train", [override])
    with pytest.raises(ConfigError) as err:
        TrainSettings.from_config(cfg)
    msg = str(err.value)
    assert f"'{key}'" in msg
    value = override.split("=", 1)[1]
    if key == override.split("=", 1)[0]:
        assert value in msg


def test_topk_needs_k():
    with pytest.raises(ConfigError, match="'model.topk'"):
        TrainSettings.from_config(compose("train", ["model.activation=topk"]))
    TrainSettings.from_config(compose("train", ["model.activation=batchtopk", "model.topk=32"]))


# ----------------------------------------------------------------------------------------------------
# Every value a user can type: the key is named, with the value, and nothing is built first.

# (overrides, key named in the message, text the message must also hold). Listed in docs/operations.md.
BAD_TRAIN = [
    (["seed=abc"], "seed", "'abc'"),
    (["seed=-1"], "seed", "-1"),
    (["seed=1.5"], "seed", "1.5"),
    (["steps=0"], "steps", "0"),
    (["steps=ten"], "steps", "'ten'"),
    (["batch_tokens=0"], "batch_tokens", "0"),
    (["grad_accum=-1"], "grad_accum", "-1"),
    (["data.num_workers=-1"], "data.num_workers", "-1"),
    (["data.num_workers=two"], "data.num_workers", "'two'"),
    (["data.timeout=0"], "data.timeout", "0"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer", "shuffle"),
    (["data.heldout_shards=-1"], "data.heldout_shards", "-1"),
    (["data.on_error=ignore"], "data.on_error", "'ignore'"),
    (["data.verify=maybe"], "data.verify", "true or false"),
    (["data.verify_upfront=1"], "data.verify_upfront", "true or false"),
    (["kernels=cuda"], "kernels", "'cuda'"),
    (["device=gpu"], "device", "'gpu'"),
    (["precision=fp16"], "precision", "'fp16'"),
    (["keep_checkpoints=-2"], "keep_checkpoints", "-2"),
    (["dead_after_tokens=-1"], "dead_after_tokens", "-1"),
    (["dead_after_tokens=0"], "dead_after_tokens", "0"),
    (["dense_fire_rate=0"], "dense_fire_rate", "0"),
    (["dense_fire_rate=1.5"], "dense_fire_rate", "1.5"),
    (["stop_at_step=-1"], "stop_at_step", "-1"),
    (["checkpoint_every=0"], "checkpoint_every", "0"),
    (["log_every=0"], "log_every", "0"),
    (["eval_every=-5"], "eval_every", "-5"),
    (["eval_every=10", "data.heldout_shards=0"], "eval_every", "heldout_shards"),
    (["train_tokens=0", "steps=null"], "train_tokens", "0"),
    (["train_tokens=100000"], "train_tokens", "steps=null"),  # both set: which one drives is not guessed
    (["steps=null"], "steps", "train_tokens"),  # neither set
    (["progress=yes"], "progress", "'yes'"),
    (["resume=''"], "resume", "''"),
    (["out_dir=${nope}"], "out_dir", "cannot be resolved"),
    (["seed=???"], "seed", "expected a value"),
    (["~seed"], "seed", "missing"),
    (["model.topk=-1"], "model.topk", "-1"),
    (["model.per_layer=sometimes"], "model.per_layer", "'sometimes'"),
    (["model.threshold_calibration_rate=0"], "model.threshold_calibration_rate", "0"),
    (["model.loss.lambda_s_ramp_fraction=2"], "model.loss.lambda_s_ramp_fraction", "2"),
    (["model.loss.auxk_k=0"], "model.loss.auxk_k", "0"),
    (["model.loss=3"], "model.loss", "3"),
    (["optim.betas=[0.9]"], "optim.betas", "[0.9]"),
    (["optim.betas=[0.9,1.0]"], "optim.betas", "[0.9, 1.0]"),
    (["optim.grad_clip=-1"], "optim.grad_clip", "-1"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps", "-1"),
    (["optim.decay_fraction=1.5"], "optim.decay_fraction", "1.5"),
    (["optim.fused=sometimes"], "optim.fused", "'sometimes'"),
    (["optim.lr=nan"], "optim.lr", "nan"),
    (["optim.lr=inf"], "optim.lr", "inf"),
    (["parallel.feature_parallel=0"], "parallel.feature_parallel", "0"),
    (["parallel.backend=mpi"], "parallel.backend", "'mpi'"),
    (["deepspeed.zero_stage=true"], "deepspeed.zero_stage", "True"),
    (["deepspeed=zero3", "parallel=fp2"], "deepspeed.zero_stage", "feature_parallel"),
    (["deepspeed.overlap_comm=1"], "deepspeed.overlap_comm", "1"),
    (["deepspeed=zero0", "precision=bf16"], "deepspeed.zero_stage", "deepspeed=zero1"),
    (["deepspeed=zero2", "deepspeed.reduce_bucket_size=0"], "deepspeed.reduce_bucket_size", "0"),
    (["logger.mode=on"], "logger.mode", "'on'"),
    (["logger.tags=abc"], "logger.tags", "'abc'"),
    (["logger.project=''"], "logger.project", "''"),
    (["dictionaries=[{optim.lr: 1}, {data.path: x}]"], "dictionaries", "data.path"),
]


@pytest.mark.parametrize("overrides,key,text", BAD_TRAIN, ids=[" ".join(o) for o, _, _ in BAD_TRAIN])
def test_every_bad_train_value_is_named(overrides, key, text):
    cfg = compose("train", overrides)
    with pytest.raises(ConfigError) as err:
        TrainSettings.from_config(cfg)
    msg = str(err.value)
    assert f"'{key}'" in msg, msg
    assert text in msg, msg


@pytest.mark.parametrize("override,key,near", [
    ("+model.n_feature=64", "model.n_feature", "model.n_features"),
    ("+stepz=5", "stepz", "steps"),
    ("+data.shuffle=0", "data.shuffle", "data.shuffle_buffer"),
    ("++optim.weight_decy=0.1", "optim.weight_decy", "optim.weight_decay"),
    ("+model.loss.lambda=1", "model.loss.lambda", None),
    ("+notes=hello", "notes", None),
])
def test_unknown_key_is_refused_even_with_plus(override, key, near):
    cfg = compose("train", [override])  # Hydra accepts the addition ...
    assert OmegaConf.select(cfg, key) is not None
    with pytest.raises(ConfigError) as err:  # ... the validation does not
        TrainSettings.from_config(cfg)
    msg = str(err.value)
    assert f"'{key}'" in msg and "unknown key" in msg and "+sweep=NAME" in msg, msg
    if near:
        assert f"did you mean '{near}'" in msg, msg


def test_extension_points_are_accepted():
    TrainSettings.from_config(compose("train", ["+sweep=dict_sizes"]))  # group selection; ${hydra:...} resolves
    for option in ("local", "slurm"):  # Hydra's own launcher group (configs/hydra/launcher/)
        cfg = compose("train", [f"hydra/launcher={option}"], return_hydra_config=True)
        TrainSettings.from_config(cfg)
    cfg = compose("train", ["hydra.run.dir=elsewhere", "+hydra.job.env_set.FOO=1"], return_hydra_config=True)
    TrainSettings.from_config(cfg)
    assert cfg.hydra.run.dir == "elsewhere"


def test_schema_lists_only_keys_that_exist():
    """No stale schema entries: every schema key is set by some option of some group."""
    seen = set()
    configs = [compose("train")] + [
        compose("train", [f"{g}={o}"]
                + (["parallel=single"] if o == "zero3" else []))
        for g in CONFIG_GROUPS if g != "sweep" for o in group_options(g)]

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                seen.add(prefix + k)

    for cfg in configs:
        walk(OmegaConf.to_container(cfg, resolve=False))
    assert set(TrainSettings.schema()) == seen


@pytest.mark.parametrize("override,text", [
    ("model=foo", "model/foo"),
    ("stepz=5", "stepz"),
    ("seed=[1,", "[1,"),
])
def test_hydra_errors_are_config_errors(override, text):
    with pytest.raises(ConfigError, match=re.escape(text)) as err:
        compose("train", [override])
    assert "Config search path" not in str(err.value)


def test_steps_or_train_tokens():
    TrainSettings.from_config(compose("train", ["steps=null", "train_tokens=100000"]))
    assert TrainSettings.from_config(compose("train", ["batch_tokens=1000", "grad_accum=2"])).resolve_steps(4) == 1000
    s = TrainSettings.from_config(compose("train", ["steps=null", "train_tokens=100001", "batch_tokens=1000",
                                                    "grad_accum=2"]))
    assert s.resolve_steps(1) == 51  # the fewest steps that consume the budget
    assert s.resolve_steps(4) == 13


@pytest.mark.parametrize("value,device,want", [
    ("auto", "cuda", "bf16"), ("auto", "cpu", "fp32"), ("fp32", "cuda", "fp32"), ("bf16", "cpu", "bf16")])
def test_resolve_precision(value, device, want):
    assert resolve_precision(value, device) == want


def test_resolve_precision_refuses_unknown():
    with pytest.raises(ConfigError, match="'precision' = 'fp8'"):
        resolve_precision("fp8", "cuda")


def test_precision_defaults_to_auto():
    assert compose("train").precision == "auto"


@pytest.mark.parametrize("overrides,world,cuda,key,text", [
    (["parallel=fp2"], 1, False, "parallel.feature_parallel", "world size 1"),
    (["parallel=fp2"], 3, False, "parallel.feature_parallel", "world size 3"),
    (["device=cuda"], 1, False, "device", "no CUDA device"),
    (["parallel.backend=nccl"], 1, False, "parallel.backend", "NCCL"),
    (["device=cpu", "parallel.backend=nccl"], 1, True, "parallel.backend", "NCCL"),
    (["kernels=triton"], 1, False, "kernels", "TRITON_INTERPRET"),
    (["deepspeed=zero0"], 1, True, "deepspeed.zero_stage", "precision=auto on CUDA"),  # auto: bf16 there
    (["steps=null", "train_tokens=1000", "batch_tokens=1024"], 1, False, "train_tokens", "1024"),
    (["steps=null", "train_tokens=3000", "batch_tokens=1024", "parallel=fp2"], 8, False, "train_tokens", "4096"),
])
def test_runtime_checks(overrides, world, cuda, key, text, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = TrainSettings.from_config(compose("train", overrides))  # valid on its own: only the launched job makes it wrong
    with pytest.raises(ConfigError) as err:
        s.check_runtime(world_size=world, cuda_available=cuda)
    assert f"'{key}'" in str(err.value) and text in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides,good,bad,interpret", [
    (["parallel=fp2"], (4, False), (3, False), None),  # a world of FP groups, not a part of one
    (["device=cuda", "kernels=triton"], (1, True), (1, False), None),  # triton where CUDA is
    (["deepspeed=zero0"], (1, False), (1, True), None),  # auto precision: fp32 on CPU, bf16 on CUDA
    (["deepspeed=zero0", "device=cpu"], (1, True), (1, True), "never"),  # cpu: fp32 even where CUDA is
    (["deepspeed=zero0", "precision=fp32"], (1, True), (1, True), "never"),
    (["kernels=triton"], (1, False), (1, False), "1"),  # on CPU only under TRITON_INTERPRET=1
])
def test_runtime_checks_pass_only_where_they_should(overrides, good, bad, interpret, monkeypatch):
    """Each case is accepted on `good` (world size, CUDA) and, where a twin exists, refused on `bad`: the
    check draws its line in the right place, not just somewhere."""
    s = TrainSettings.from_config(compose("train", overrides))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if interpret == "1":
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            s.check_runtime(*good)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert s.check_runtime(*good) is None
    if interpret is None:
        with pytest.raises(ConfigError):
            s.check_runtime(*bad)


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_online_logging_needs_a_key(no_wandb_key, monkeypatch):
    cfg = compose("train", ["logger.mode=online"])
    with pytest.raises(ConfigError, match=r"'logger\.mode' = 'online'.*logger\.mode=offline"):
        TrainSettings.from_config(cfg)
    # a .netrc entry for another host is not a key for W&B
    (no_wandb_key / ".netrc").write_text("machine example.com login user password secret\n")
    with pytest.raises(ConfigError, match="no W&B API key"):
        TrainSettings.from_config(cfg)
    (no_wandb_key / ".netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    TrainSettings.from_config(cfg)  # as `wandb login` writes it
    (no_wandb_key / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    TrainSettings.from_config(cfg)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    (no_wandb_key / ".netrc").write_text("machine wandb.example.org login user password 0123456789abcdef\n")
    TrainSettings.from_config(cfg)  # a self-hosted server's entry


@pytest.mark.parametrize("name,validate,base,overrides,key", [
    ("eval", EvalSettings.from_config, ["model_dir=runs/clt"], ["+foo=1"], "foo"),
    ("eval", EvalSettings.from_config, [], [], "model_dir"),
    ("eval", EvalSettings.from_config, ["model_dir=runs/clt"], ["batch_tokens=0"], "batch_tokens"),
    ("eval", EvalSettings.from_config, ["model_dir=runs/clt"], ["split=test"], "split"),
    ("eval", EvalSettings.from_config, ["model_dir=runs/clt"], ["replacement.skip_documents=-1"], "replacement.skip_documents"),
    ("eval", EvalSettings.from_config, ["model_dir=runs/clt"], ["frontier=abc"], "frontier"),
    ("export", ExportSettings.from_config, ["model_dir=runs/clt"], ["+model.n_features=3"], "model"),
    ("export", ExportSettings.from_config, [], [], "model_dir"),
    ("export", ExportSettings.from_config, ["model_dir=runs/clt"], ["dtype=int8"], "dtype"),
    ("export", ExportSettings.from_config, ["model_dir=runs/clt"], ["calibration.tokens=0"], "calibration.tokens"),
    ("export", ExportSettings.from_config, ["model_dir=runs/clt"], ["overwrite=yes"], "overwrite"),
    ("harvest", HarvestSettings.from_config, [], ["+max_token=5"], "max_token"),
    ("harvest", HarvestSettings.from_config, [], ["seed=abc"], "seed"),
    ("harvest", HarvestSettings.from_config, [], ["layers=[3,1]"], "layers"),
    ("harvest", HarvestSettings.from_config, [], ["context=1"], "context"),
    ("harvest", HarvestSettings.from_config, [], ["name=a/b"], "name"),
    ("harvest", HarvestSettings.from_config, [], ["threads=0"], "threads"),
])
def test_other_commands_name_bad_keys(name, validate, base, overrides, key):
    if base or name == "harvest":
        validate(compose(name, base))  # the base itself is valid: the override is what fails
    with pytest.raises(ConfigError, match=f"'{re.escape(key)}'"):
        validate(compose(name, base + overrides))


def test_eval_frontier_only_needs_no_model_dir():
    s = EvalSettings.from_config(compose("eval", ["frontier=[a/metrics.json,b/metrics.json]", "out_dir=plots"]))
    assert s.model_dir is None and s.frontier == ["a/metrics.json", "b/metrics.json"] and s.out_dir == "plots"
    with pytest.raises(ConfigError, match="'model_dir'"):  # neither a model nor a frontier: nothing to do
        EvalSettings.from_config(compose("eval", ["out_dir=plots"]))


@pytest.mark.parametrize("name,settings", [("train", TrainSettings), ("eval", EvalSettings),
                                           ("export", ExportSettings), ("harvest", HarvestSettings)])
def test_code_defaults_agree_with_configs(name, settings):
    """Every default of a command's settings class equals the default configs/ composes, key by key, and
    every key configs/ has is the code's (interpolated paths compare as they resolve with the defaults)."""
    composed = OmegaConf.to_container(compose(name), resolve=True)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    code, configs = flat(settings.defaults()), flat(composed)
    schema = settings.schema()
    assert set(configs) <= set(code)
    assert all(not schema[k].required for k in set(code) - set(configs))  # keys only some group options set
    code = {k: v for k, v in code.items() if k in configs}
    differ = {k: (code[k], configs[k]) for k in code if code[k] != configs[k] or type(code[k]) is not type(configs[k])}
    assert not differ, f"code default vs configs/ default: {differ}"


# ----------------------------------------------------------------------------------------------------
# The real console script: a bad value ends with one line naming it and exit code 2, never a traceback.


def _cli(args, tmp_path, env_extra=None):
    exe = Path(sys.executable).with_name("clt-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cltrain.train.trainer"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY", "NETRC")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd + [f"out_dir={tmp_path / 'run'}", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # generous: the machine may be busy


@pytest.mark.parametrize("args,key", [
    (["seed=abc"], "seed"),
    (["+model.n_feature=64"], "model.n_feature"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer"),
    (["logger.mode=online"], "logger.mode"),
])
def test_clt_train_bad_value_exits_2_without_traceback(args, key, tmp_path):
    proc = _cli(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert f"clt-train: error: config key '{key}'" in proc.stderr, out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_clt_train_hydra_error_has_no_traceback(tmp_path):
    proc = _cli(["model=foo"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert "Could not find 'model/foo'" in out and "plt" in out, out  # Hydra lists the options
