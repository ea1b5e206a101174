"""clt-train end to end on tiny synthetic data: resume bit-for-bit, loss falls, bad input, atomic checkpoints.

Runs in-process (one process, a 1-rank gloo group, the DeepSpeed engine), fp32 on CPU.
"""
import errno
import json
import os

import pytest
import torch

from cltrain.train import dictionary, trainer
from cltrain.train.checkpoint import CheckpointError
from cltrain.train.clt import CLT
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.data import ActivationLoader, DatasetError, write_synthetic_dataset
from cltrain.train import model_io
from cltrain.train.model_io import ModelReader, load_clt

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ds"
    write_synthetic_dataset(path, n_layers=3, d_model=8, n_tokens=2048, tokens_per_sample=16,
                            shard_tokens=256, seed=0)
    return path


def config(dataset, out, *overrides):
    return compose("train", [
        f"data.path={dataset}", f"out_dir={out}", "model.n_features=16", "steps=8", "batch_tokens=64",
        "checkpoint_every=100", "log_every=2", "logger.mode=disabled", "progress=false",
        "data.num_workers=0", "data.shuffle_buffer=256", "data.heldout_shards=1", *overrides])


def weights(model_dir):
    """The whole model's tensors, assembled from its feature shards."""
    reader = ModelReader(model_dir)
    return {k: reader.tensor(k) for k in reader.expected_shapes()}


def test_resume_is_bit_for_bit(dataset, tmp_path):
    # Calibration, AuxK (dead-feature state), warm-up/decay, lambda_s ramp and grad accumulation all on,
    # so everything a checkpoint must carry is exercised.
    extra = ["model.threshold_calibration_rate=0.2", "model.loss.auxk=0.1", "dead_after_tokens=128",
             "optim.warmup_steps=2", "grad_accum=2"]
    straight = trainer.train(config(dataset, tmp_path / "a", *extra))
    # The interrupted run also logs to W&B (offline): the resumed half must continue the same W&B run.
    trainer.train(config(dataset, tmp_path / "b", *extra, "stop_at_step=4", "logger.mode=offline"))
    assert (tmp_path / "b/checkpoints/latest").read_text().strip() == "step-000004"
    run_id = json.loads((tmp_path / "b/checkpoints/step-000004/trainer.json").read_text())["wandb_run_id"]
    assert run_id and any((tmp_path / "b/wandb").glob(f"offline-run-*-{run_id}"))
    resumed = trainer.train(config(dataset, tmp_path / "b", *extra, "resume=true", "logger.mode=offline"))
    wa, wb = weights(straight), weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    state = json.loads((tmp_path / "b/checkpoints/step-000008/trainer.json").read_text())
    assert state["step"] == 8 and state["tokens"] == 8 * 2 * 64 and state["wandb_run_id"] == run_id
    # The saved model is the whole CLT with its dataset metadata, loadable by clt-eval / clt-export.
    clt, meta = load_clt(resumed)
    assert clt.cfg.n_features == 16 and meta["train"]["step"] == 8
    assert meta["dataset"]["n_layers"] == 3 and len(meta["dataset"]["scale_x"]) == 3


@torch.no_grad()
def _mse(clt, batches):
    return sum(float((clt(b.x)[1] - b.y).pow(2).sum(-1).mean()) for b in batches) / len(batches)


def test_loss_falls(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "run", "steps=60", "optim.lr=0.02", "model.loss.lambda_s=0.001",
                 "model.n_features=32", "log_every=20")
    model_dir = trainer.train(cfg)
    trained, meta = load_clt(model_dir)
    initial = CLT(trained.cfg, generator=torch.Generator().manual_seed(0))
    loader = ActivationLoader(dataset, 256, split="heldout", heldout_shards=1, epochs=1, shuffle_buffer=0)
    batches = list(loader)
    before, after = _mse(initial, batches), _mse(trained, batches)
    assert after < 0.8 * before, (before, after)


def test_config_that_does_not_match_the_dataset(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_layers.*dataset\.json"):
        trainer.train(config(dataset, tmp_path / "r", "model.n_layers=5"))
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        trainer.train(config(dataset, tmp_path / "r", "model.d_model=7"))
    with pytest.raises(DatasetError, match="nowhere"):
        trainer.train(config(tmp_path / "nowhere", tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing written


def test_resume_from_another_config_fails(dataset, tmp_path):
    trainer.train(config(dataset, tmp_path / "r", "steps=2"))
    with pytest.raises(ConfigError, match=r"model\.n_features.*16.*32") as e:
        trainer.train(config(dataset, tmp_path / "r", "steps=2", "model.n_features=32", "resume=true"))
    assert "step-000002" in str(e.value)
    with pytest.raises(CheckpointError, match="missing-ckpt"):
        trainer.train(config(dataset, tmp_path / "r", f"resume={tmp_path / 'missing-ckpt'}"))


def test_crash_mid_checkpoint_keeps_latest(dataset, tmp_path, monkeypatch):
    calls = []
    real_close = model_io.StreamingSafetensorsWriter.close

    def failing_close(writer):
        calls.append(writer.path)
        if len(calls) == 3:  # the second checkpoint's weight shard: the disk is full halfway through
            writer.abort()
            raise OSError(errno.ENOSPC, "No space left on device", str(writer.path))
        return real_close(writer)

    monkeypatch.setattr(model_io.StreamingSafetensorsWriter, "close", failing_close)
    out = tmp_path / "r"
    with pytest.raises(CheckpointError, match="No space left.*step-000002"):
        trainer.train(config(dataset, out, "steps=4", "checkpoint_every=2"))
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]  # no half-written step 4
    monkeypatch.setattr(model_io.StreamingSafetensorsWriter, "close", real_close)
    final = trainer.train(config(dataset, out, "steps=4", "checkpoint_every=2", "resume=true"))
    assert weights(final)["W_enc"].shape == (3, 16, 8)
    assert (root / "latest").read_text().strip() == "step-000004"


def test_schedules():
    lr = [dictionary.lr_at(s, 10, 1.0, 2, 0.2) for s in range(10)]
    assert lr[:3] == [0.5, 1.0, 1.0] and lr[8:] == [1.0, 0.5]  # warm-up, flat, decay over the last 2
    lam = [dictionary.lambda_s_at(s, 10, 2.0, 0.5) for s in (0, 1, 5, 9)]
    assert lam == [0.0, 0.4, 2.0, 2.0]


def test_launcher_args_are_stripped(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = trainer.strip_launcher_args(["clt-train", "--local_rank=1", "steps=3", "--local-rank", "1", "x=1"])
    assert argv == ["clt-train", "steps=3", "x=1"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_zero3_matches_zero1_and_bf16_runs(dataset, tmp_path):
    w1 = weights(trainer.train(config(dataset, tmp_path / "z1", "steps=3", "deepspeed=zero1")))
    w3 = weights(trainer.train(config(dataset, tmp_path / "z3", "steps=3", "deepspeed=zero3")))
    for k in w1:
        torch.testing.assert_close(w3[k], w1[k], rtol=1e-6, atol=1e-7, msg=k)
    # bf16 weights with fp32 master weights: the saved model is fp32 and whole
    wb = weights(trainer.train(config(dataset, tmp_path / "bf", "steps=3", "precision=bf16")))
    assert wb["W_enc"].dtype == torch.float32 and wb["W_enc"].shape == w1["W_enc"].shape
    assert (wb["W_enc"] - w1["W_enc"]).abs().max() < 0.05
