"""The Hydra config tree: every group composes, defaults follow DESIGN section 1, bad values are named."""
import pytest

from cltrain.train.config import CONFIG_DIR, CONFIG_GROUPS, ConfigError, compose, validate_train


def group_options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_exists():
    for group in CONFIG_GROUPS:
        assert group_options(group), f"configs/{group}/ has no options"


@pytest.mark.parametrize("group", [g for g in CONFIG_GROUPS if g != "sweep"])
def test_every_option_of_every_group_composes_and_validates(group):
    for option in group_options(group):
        overrides = [f"+{group}={option}"] if group == "launcher" else [f"{group}={option}"]
        if group == "deepspeed" and option == "zero3":
            overrides.append("parallel=single")
        cfg = compose("train", overrides)
        validate_train(cfg)


def test_sweep_composes():
    cfg = compose("train", ["+sweep=dict_sizes"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["model.n_features"] == "1024,2048,4096"
    assert cfg.hydra.sweeper.params.model == "clt,plt"


def test_defaults_follow_the_design():
    cfg = compose("train")
    validate_train(cfg)
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
        validate_train(cfg)
    msg = str(err.value)
    assert f"'{key}'" in msg
    value = override.split("=", 1)[1]
    if key == override.split("=", 1)[0]:
        assert value in msg


def test_topk_needs_k():
    with pytest.raises(ConfigError, match="'model.topk'"):
        validate_train(compose("train", ["model.activation=topk"]))
    validate_train(compose("train", ["model.activation=batchtopk", "model.topk=32"]))
