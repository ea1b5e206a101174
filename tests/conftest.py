"""Shared fixtures: small synthetic activation datasets (no language model needed)."""
import pytest

from cltrain.train.data import write_synthetic_dataset


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(name="ds", **kw) -> DatasetInfo: a synthetic dataset under tmp_path (small defaults)."""
    def make(name="ds", **kw):
        args = dict(n_layers=3, d_model=8, n_tokens=640, tokens_per_sample=16, shard_tokens=128, seed=0)
        args.update(kw)
        return write_synthetic_dataset(tmp_path / name, **args)
    return make
