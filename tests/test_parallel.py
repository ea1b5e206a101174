"""Feature parallelism (DESIGN section 3) with real processes: FP=2 reproduces the FP=1 run.

The FP=2 job is launched the way users launch it (torchrun, the clt-train Hydra entry point, gloo on
CPU) with a `--local_rank=0` the deepspeed launcher would append, and is itself stopped and resumed
halfway, so the sharded checkpoint round trip is covered too.
"""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cltrain.train import trainer
from cltrain.train.clt import CLT, CLTConfig
from cltrain.train.config import compose
from cltrain.train.data import write_synthetic_dataset
from cltrain.train.parallel import Layout, init_distributed, shard_clt

pytestmark = pytest.mark.timeout(300)

COMMON = ["model.n_features=16", "steps=6", "batch_tokens=64", "checkpoint_every=100", "log_every=3",
          "logger.mode=disabled", "progress=false", "data.num_workers=0", "data.shuffle_buffer=256",
          "data.heldout_shards=0", "model.threshold_calibration_rate=0.2", "optim.lr=0.01"]


def test_shard_of_one_rank_is_the_model():
    init_distributed("gloo")
    layout = Layout.build(1)
    assert (layout.fp_size, layout.dp_size, layout.fp_rank, layout.dp_rank) == (1, 1, 0, 0)
    mpu = layout.mpu()
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_data_parallel_world_size() == 1
    clt = CLT(CLTConfig(3, 8, 16))
    assert shard_clt(clt, layout) is clt


def _torchrun(args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this test process's own 1-rank group must not leak into the children
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cltrain.train.trainer", *args, "--local_rank=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_feature_parallel_two_ranks_match_one(tmp_path):
    data = tmp_path / "ds"
    write_synthetic_dataset(data, n_layers=3, d_model=8, n_tokens=1024, tokens_per_sample=16,
                            shard_tokens=256, seed=1)
    ref = trainer.train(compose("train", [f"data.path={data}", f"out_dir={tmp_path / 'fp1'}", *COMMON]))

    out = tmp_path / "fp2"
    args = [f"data.path={data}", f"out_dir={out}", "parallel=fp2", *COMMON]
    first = _torchrun(args + ["stop_at_step=3"])
    assert "data x feature parallel = 1 x 2" in first
    ckpt = out / "checkpoints" / "step-000003"
    assert {p.name for p in ckpt.iterdir()} >= {"rank-00000.pt", "rank-00001.pt", "ds", "model", "trainer.json"}
    assert {p.name for p in (ckpt / "ds" / "state").glob("mp_rank_*_model_states.pt")} == {
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"}
    assert (out / "hydra" / "rank0").is_dir() and (out / "hydra" / "rank1").is_dir()
    second = _torchrun(args + ["resume=true"])
    assert "resumed from" in second

    want, got = load_file(str(ref / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].shape == got[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # the run actually moved the weights (so the comparison is not of two initializations)
    init = CLT(CLTConfig(3, 8, 16), generator=torch.Generator().manual_seed(0)).state_dict()
    assert not torch.allclose(init["W_enc"], got["W_enc"])
