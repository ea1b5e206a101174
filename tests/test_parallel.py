"""Feature and data parallelism (docs/design.md section 3) with real processes (torchrun, gloo, CPU, fp32).

- every feature-parallel size starts from the same weights, built slice by slice (never whole);
- a feature-parallel slice computes what the whole CLT computes, for every activation (TopK and
  BatchTopK through the sharded top-k cut) and AuxK;
- DP=2 x FP=2 under ZeRO-1 and ZeRO-2 (4 ranks) equals one process on the same tokens, with gradient
  clipping engaged;
- a 4-rank run stopped and resumed equals the uninterrupted run bit for bit;
- a run resumes on another layout (FP=2 x DP=2 -> FP=1 x DP=2 -> FP=4 x DP=1, ZeRO-2 -> ZeRO-1) with the
  losses of the uninterrupted run; per-rank parameter + optimizer bytes are 1/FP of the whole;
- bad input: an FP size that does not divide the features or the world, a missing or truncated
  shard, another model shape: an error naming the key or file, before any step, checkpoints untouched.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cltrain.train import trainer
from cltrain.train.checkpoint import CheckpointError
from cltrain.train.clt import CLT, CLTConfig
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.data import ActivationLoader, write_synthetic_dataset
from cltrain.train.model_io import ModelReader

pytestmark = pytest.mark.timeout(900)

STEPS = 20
COMMON = ["model.n_features=16", f"steps={STEPS}", "checkpoint_every=100", "log_every=1",
          "logger.mode=disabled", "progress=false", "data.num_workers=0", "data.shuffle_buffer=256",
          "data.heldout_shards=0", "optim.lr=0.01", "optim.grad_clip=0.5", "model.loss.lambda_s=0.5"]
B = 32  # tokens per data-parallel replica per step


def test_every_fp_size_starts_from_the_same_weights():
    cfg = CLTConfig(n_layers=3, d_model=8, n_features=1024)
    whole = CLT(cfg, seed=5)
    for P in (2, 4, 8):
        per = cfg.n_features // P
        parts = [CLT(CLTConfig(3, 8, per), seed=5, feature_range=(r * per, cfg.n_features)) for r in range(P)]
        assert torch.equal(torch.cat([p.W_enc.detach() for p in parts], 1), whole.W_enc.detach())
        for s in range(3):
            assert torch.equal(torch.cat([p.W_dec[s].detach() for p in parts], 0), whole.W_dec[s].detach())
    other = CLT(cfg, seed=6)
    assert not torch.equal(other.W_enc, whole.W_enc)
    # built on the meta device: the structure, without memory
    meta = CLT(cfg, seed=5, device="meta")
    assert meta.W_enc.is_meta and all(w.is_meta for w in meta.W_dec)


def _torchrun(nproc, args, module=("-m", "cltrain.train.trainer"), timeout=300, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this test process's own 1-rank group must not leak into the children
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *module, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-5000:]
    return proc


def test_a_feature_slice_computes_what_the_whole_clt_computes():
    worker = str(Path(__file__).with_name("fp_equivalence_worker.py"))
    out = _torchrun(2, [worker, "2"], module=()).stdout
    assert out.count("OK 3") == 2, out


def _losses(out_dir):
    return {r["step"]: r for r in map(json.loads, Path(out_dir, "metrics.jsonl").read_text().splitlines())}


def _weights(model_dir):
    reader = ModelReader(model_dir)
    return {k: reader.tensor(k) for k in reader.expected_shapes()}


def _close(a, b, rtol=1e-5):
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The multi-rank runs the tests below compare (run once: each torchrun start costs seconds)."""
    root = tmp_path_factory.mktemp("fp")
    data = root / "ds"
    write_synthetic_dataset(data, n_layers=3, d_model=8, n_tokens=4096, tokens_per_sample=16,
                            shard_tokens=256, seed=1)
    base = [f"data.path={data}", *COMMON]
    r = {"data": data, "root": root}
    # DP=2 x FP=2, ZeRO-1, straight through
    _torchrun(4, base + [f"out_dir={root / 'z1'}", "parallel=fp2", "deepspeed=zero1", f"batch_tokens={B}"])
    # DP=2 x FP=2, ZeRO-2: straight through, and stopped at 10 then resumed
    _torchrun(4, base + [f"out_dir={root / 'z2'}", "parallel=fp2", "deepspeed=zero2", f"batch_tokens={B}"])
    _torchrun(4, base + [f"out_dir={root / 'z2s'}", "parallel=fp2", "deepspeed=zero2", f"batch_tokens={B}",
                         "stop_at_step=10"])
    _torchrun(4, base + [f"out_dir={root / 'z2s'}", "parallel=fp2", "deepspeed=zero2", f"batch_tokens={B}",
                         "resume=true"])
    # the step-10 checkpoint resumed as FP=1 x DP=2 (ZeRO-1) to step 15, then as FP=4 x DP=1 (the data-
    # parallel size halves, so the batch per replica doubles) to the end
    _torchrun(2, base + [f"out_dir={root / 'fp1'}", "deepspeed=zero1", f"batch_tokens={B}", "stop_at_step=15",
                         f"resume={root / 'z2s' / 'checkpoints' / 'step-000010'}"])
    _torchrun(4, base + [f"out_dir={root / 'dp1'}", "parallel.feature_parallel=4", "deepspeed=zero1",
                         f"batch_tokens={2 * B}", f"resume={root / 'fp1' / 'checkpoints' / 'step-000015'}"])
    # one process to step 10, then FP=4 (same data-parallel size) to the end; and one process straight
    one = [*base, "deepspeed=zero1", f"batch_tokens={2 * B}"]
    trainer.train(compose("train", one + [f"out_dir={root / 'one'}"]))
    trainer.train(compose("train", one + [f"out_dir={root / 'one10'}", "stop_at_step=10"]))
    _torchrun(4, one + [f"out_dir={root / 'fp4'}", "parallel.feature_parallel=4",
                        f"resume={root / 'one10' / 'checkpoints' / 'step-000010'}"])
    # FP=4 x DP=1 (ZeRO-1 configured, run as stage 0: one replica) to step 10, resumed as FP=2 x DP=2 ZeRO-1
    _torchrun(4, one + [f"out_dir={root / 'fp4s'}", "parallel.feature_parallel=4", "stop_at_step=10"])
    _torchrun(4, base + [f"out_dir={root / 'fp2dp2'}", "parallel=fp2", "deepspeed=zero1", f"batch_tokens={B}",
                         f"resume={root / 'fp4s' / 'checkpoints' / 'step-000010'}"])
    return r


def test_dp2_fp2_equals_one_process_on_the_same_tokens(runs, tmp_path):
    """One process, batch 2B, fed at each step the union of what the two data-parallel replicas read."""
    cfg = compose("train", [f"data.path={runs['data']}", f"out_dir={tmp_path}", *COMMON, f"batch_tokens={2 * B}"])
    t = trainer.Trainer.build(cfg)
    try:
        replicas = [iter(ActivationLoader(runs["data"], B, dp_rank=d, dp_size=2, seed=0, shuffle_buffer=256))
                    for d in range(2)]
        ref = {}
        for _ in range(STEPS):
            parts = [next(r) for r in replicas]
            batch = (torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))  # normalized float32
            step = t.step + 1
            ref[step] = t.train_step([batch])[0]
        ref_w = {k: v.detach().clone() for k, v in t.dictionaries[0].clt.state_dict().items()}
    finally:
        t.close()
    assert max(v["grad_norm"] for v in ref.values()) > 0.5  # clipping (at 0.5) engaged
    for name in ("z1", "z2"):
        got = _losses(runs["root"] / name)
        assert sorted(got) == list(range(1, STEPS + 1))
        for s in ref:
            for key in ("loss/total", "loss/mse", "loss/sparsity", "grad_norm"):
                assert got[s][key] == pytest.approx(ref[s][key], rel=1e-5), (name, s, key)
        _close(ref_w, _weights(runs["root"] / name / "model"))


def test_multi_rank_resume_is_bit_for_bit(runs):
    straight, resumed = _weights(runs["root"] / "z2" / "model"), _weights(runs["root"] / "z2s" / "model")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    a, b = _losses(runs["root"] / "z2"), _losses(runs["root"] / "z2s")
    assert sorted(b) == list(range(1, STEPS + 1))  # steps after the checkpoint logged once
    assert all(a[s]["loss/total"] == b[s]["loss/total"] for s in a)


def test_resume_on_other_layouts_continues_the_run(runs):
    """FP=2 -> FP=1 (and ZeRO-2 -> ZeRO-1) and FP=1 -> FP=4 continue with the uninterrupted run's losses
    and end on its weights."""
    z2, fp1 = _losses(runs["root"] / "z2"), _losses(runs["root"] / "fp1")
    assert sorted(fp1) == list(range(11, 16))
    for s, v in fp1.items():
        assert v["loss/total"] == pytest.approx(z2[s]["loss/total"], rel=1e-5), s
    one, fp4 = _losses(runs["root"] / "one"), _losses(runs["root"] / "fp4")
    assert sorted(fp4) == list(range(11, STEPS + 1))
    for s, v in fp4.items():
        assert v["loss/total"] == pytest.approx(one[s]["loss/total"], rel=1e-5), s
    _close(_weights(runs["root"] / "one" / "model"), _weights(runs["root"] / "fp4" / "model"))


def test_fp4_dp1_checkpoint_resumes_on_fp2_dp2_zero1(runs):
    """A checkpoint written by FP=4 x DP=1 (which runs stage 0: nothing to shard) resumes on FP=2 x DP=2
    under ZeRO-1 and trains to the end; up to the checkpoint the FP=4 run followed one process."""
    one, fp4s = _losses(runs["root"] / "one"), _losses(runs["root"] / "fp4s")
    assert sorted(fp4s) == list(range(1, 11))
    for s, v in fp4s.items():
        assert v["loss/total"] == pytest.approx(one[s]["loss/total"], rel=1e-5), s
    resumed = _losses(runs["root"] / "fp2dp2")
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert all(v["tokens"] == s * 2 * B for s, v in resumed.items())
    # the same tokens, grouped into the DP=2 replicas' batches: close to the uninterrupted run, not equal
    assert resumed[STEPS]["loss/total"] == pytest.approx(one[STEPS]["loss/total"], rel=0.1)


def test_resume_on_another_data_parallel_size_continues_the_epoch(runs):
    """DP=2 -> DP=1 (with FP=1 -> FP=4): the loader positions of both old replicas are merged, so the
    run continues the epoch where the two replicas were (each token once: tests/test_data_loader.py
    checks the token accounting) and trains on."""
    dp1 = _losses(runs["root"] / "dp1")
    assert sorted(dp1) == list(range(16, STEPS + 1))
    assert all(v["tokens"] == s * 2 * B for s, v in dp1.items())
    z2 = _losses(runs["root"] / "z2")
    # other batches than the DP=2 run's (the same tokens, grouped differently): close, not equal
    assert dp1[STEPS]["loss/total"] == pytest.approx(z2[STEPS]["loss/total"], rel=0.1)


def test_per_rank_state_is_a_feature_slice(runs):
    """Parameters + optimizer state on each FP=4 rank are a quarter of the whole CLT's, plus the replicated
    b_dec: with one data-parallel replica the configured ZeRO-1 runs as stage 0, so the fp32 weights and
    Adam's two moments, without ZeRO's fp32 master copy (issue 26)."""
    cfg = CLTConfig(3, 8, 16)
    whole = sum(p.numel() for p in CLT(cfg, device="meta").parameters())
    b_dec = 3 * 8
    reports = [json.loads(p.read_text()) for p in sorted((runs["root"] / "fp4" / "memory").glob("rank-*.json"))]
    assert len(reports) == 4
    for rep in reports:
        expected = ((whole - b_dec) / 4 + b_dec) * 4 * 3  # 3 fp32 copies of the slice
        assert rep["state_bytes"] == pytest.approx(expected, rel=0.02), rep


def test_bad_layouts_are_named(tmp_path, make_dataset):
    info = make_dataset()
    base = [f"data.path={info.path}", f"out_dir={tmp_path / 'r'}", *COMMON, "steps=2", f"batch_tokens={B}"]
    with pytest.raises(ConfigError, match=r"model\.n_features.*parallel\.feature_parallel=3"):
        trainer.train(compose("train", base + ["parallel.feature_parallel=3"]))
    with pytest.raises(ConfigError, match=r"feature_parallel' = 2: expected a divisor of the world size 1"):
        trainer.train(compose("train", base + ["parallel=fp2"]))
    assert not (tmp_path / "r" / "checkpoints").exists()


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_checkpoint_is_named_before_any_step(tmp_path, make_dataset, damage):
    info = make_dataset()
    base = [f"data.path={info.path}", f"out_dir={tmp_path / 'r'}", *COMMON, "steps=4", f"batch_tokens={B}"]
    trainer.train(compose("train", base + ["stop_at_step=2"]))
    ckpt = tmp_path / "r" / "checkpoints" / "step-000002"
    victim = ckpt / "optim" / "optim-00000-of-00001.safetensors"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:100])
    before = _tree(tmp_path / "r" / "checkpoints")
    with pytest.raises(CheckpointError, match=rf"{victim}: (missing|\d+ bytes, \d+ expected)"):
        trainer.train(compose("train", base + ["resume=true"]))
    assert _tree(tmp_path / "r" / "checkpoints") == before  # nothing touched
    assert not any(json.loads(line)["step"] > 2 for line in
                   (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())  # no step was taken


def test_resume_onto_another_model_shape_is_named(tmp_path, make_dataset):
    info = make_dataset()
    base = [f"data.path={info.path}", f"out_dir={tmp_path / 'r'}", *COMMON, "steps=4", f"batch_tokens={B}"]
    trainer.train(compose("train", base + ["stop_at_step=2"]))
    before = _tree(tmp_path / "r" / "checkpoints")
    with pytest.raises(ConfigError, match=r"'model\.n_features' = 16 in the checkpoint, 32 now"):
        trainer.train(compose("train", base + ["resume=true", "model.n_features=32"]))
    with pytest.raises(ConfigError, match=r"'global_batch_tokens' = 32 in the checkpoint, 64 now"):
        trainer.train(compose("train", base + ["resume=true", f"batch_tokens={2 * B}"]))
    assert _tree(tmp_path / "r" / "checkpoints") == before


def test_export_streams_a_sharded_model_like_a_whole_one(runs, tmp_path):
    """clt-export reads the FP=2 model's shards one layer at a time; the result equals the export of the
    same CLT assembled whole."""
    from safetensors.torch import load_file

    from cltrain.train.export import export
    from cltrain.train.model_io import clt_state, load_clt, save_clt

    sharded = runs["root"] / "z2" / "model"
    assert len(list(sharded.glob("weights-*-of-00002.safetensors"))) == 2
    clt, meta = load_clt(sharded)
    whole = tmp_path / "whole"
    save_clt(whole, clt_state(clt), clt.cfg, {k: v for k, v in meta.items() if k not in ("clt_config", "weights")})
    a, b = export(sharded, tmp_path / "a"), export(whole, tmp_path / "b")
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors")) and len(files) == 6
    for name in files:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
