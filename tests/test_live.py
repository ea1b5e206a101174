"""Live activations (train/live.py): a tiny random model feeds the CLT directly. The rows equal what
clt-harvest writes for the same text; a resumed or preempted run equals the uninterrupted one; generation
in a process equals generation in the training process; feature-parallel ranks split the generation and
train as one process does; replicas read disjoint contexts; write-through shards hold the served rows;
faults get named errors."""
import json
import logging
import signal
import subprocess
import sys
import time

import pytest
import torch

from cltrain.errors import ConfigError
from cltrain.train import lifecycle, trainer
from cltrain.train.checkpoint import load_rank_file, rank_file
from cltrain.train.config import TrainSettings, compose
from cltrain.train.data import ActivationLoader, DatasetError, DatasetInfo, read_samples
from cltrain.train.dictionary import OutOfMemory
from cltrain.train.harvest import harvest
from cltrain.train.live import LiveLoader, window_contexts
from cltrain.train.model_io import ModelReader

from ranks import Ranks, rank_env

pytestmark = pytest.mark.timeout(600)

LIVE = ["data=live", "data.live.base_model=tiny-llama", "data.live.context=16", "data.live.batch_size=4",
        "data.live.scale_tokens=128", "data.shuffle_buffer=100"]
COMMON = LIVE + ["model.n_features=16", "batch_tokens=64", "logger.mode=disabled", "progress=false", "log_every=1",
                 "kernels=dense", "checkpoint_every=1000", "optim.lr=0.01"]


def _weights(model_dir):
    reader = ModelReader(model_dir)
    return {k: reader.tensor(k) for k in reader.expected_shapes()}


def _equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _loader(overrides=(), **kw) -> LiveLoader:
    s = TrainSettings.from_config(compose("train", COMMON + list(overrides)))
    return LiveLoader.open(s.data.live, s.batch_tokens, s.data.shuffle_buffer, s.seed,
                           num_workers=s.data.num_workers, **kw)


def _rows(batches) -> list[tuple]:
    """Each row as (token id, x..., y...), sorted: a multiset that can be compared exactly."""
    rows = torch.cat([torch.cat([b[2].double()[:, None], b[0].double().flatten(1), b[1].double().flatten(1)], 1)
                      for b in batches])
    return sorted(map(tuple, rows.tolist()))


def _windows(loader: LiveLoader, n: int) -> list[dict]:
    """The loader's first n windows as served (rows sorted by place in the text, then shuffled)."""
    loader._sources = loader._open_sources(0)
    try:
        return [loader._window(k) for k in range(n)]
    finally:
        loader.close()


def test_live_rows_equal_what_harvest_writes(tmp_path):
    """Window 0's rows (its contexts, BOS dropped) are the rows clt-harvest captures from the same contexts."""
    n_ctx = window_contexts(100, 16)
    w0 = _windows(_loader(["data.num_workers=0"]), 1)[0]
    n = w0["ids"].shape[0]
    assert w0["x"].dtype == torch.bfloat16 and n <= 15 * n_ctx and set((w0["key"] // 16).tolist()) == set(range(n_ctx))
    cfg = compose("harvest", ["base_model=tiny-llama", "context=16", "batch_size=4", f"max_tokens={16 * n_ctx}",
                              "tokens_per_sample=1", f"shard_tokens={n}", f"shuffle_buffer={n}",
                              f"out_dir={tmp_path / 'acts'}", "seed=0"])
    info = harvest(cfg)
    harvested = [t for rec in info.shards for _, t, _ in read_samples(str(tmp_path / "acts" / rec["name"]))]
    assert sum(t["x"].shape[0] for t in harvested) == n
    assert _rows([(t["x"], t["y"], t["token_ids"]) for t in harvested]) == _rows([(w0["x"], w0["y"], w0["ids"])])


def test_resumed_run_equals_uninterrupted_and_workers_equal_in_process(tmp_path):
    full = trainer.train(compose("train", COMMON + ["steps=8", "data.num_workers=1", f"out_dir={tmp_path / 'full'}"]))
    cut = COMMON + ["steps=8", "data.num_workers=1", f"out_dir={tmp_path / 'cut'}"]
    trainer.train(compose("train", cut + ["stop_at_step=3"]))  # 192 tokens: mid-way through window 1
    state = load_rank_file(tmp_path / "cut" / "checkpoints" / "step-000003" / rank_file(0))
    assert state["loader"]["offset"] > 0  # the resume regenerates a window and starts inside it
    resumed = trainer.train(compose("train", cut + ["resume=true"]))
    in_process = trainer.train(compose("train", COMMON + ["steps=8", "data.num_workers=0",
                                                          f"out_dir={tmp_path / 'inproc'}"]))
    a = _weights(full)
    assert _equal(a, _weights(resumed)) and _equal(a, _weights(in_process))
    meta = json.loads((full / "model.json").read_text())
    assert meta["dataset"]["model"] == "tiny-llama" and len(meta["dataset"]["scale_x"]) == 4


def test_preemption_mid_window_resumes_exactly(tmp_path):
    args = COMMON + ["steps=400", "data.num_workers=1"]
    out = tmp_path / "pre"
    log = open(tmp_path / "job.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cltrain.train.trainer", f"out_dir={out}", *args],
                            env=rank_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() - t0 < 180, log.seek(0) or log.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # 5+ steps of 64 tokens: windows are ~105 rows, so mostly mid-window
    proc.wait(timeout=120)
    log.seek(0)
    text = log.read()
    assert proc.returncode == lifecycle.EXIT_PREEMPTED, text[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    resumed = trainer.train(compose("train", [f"out_dir={out}", *args, "resume=true", f"stop_at_step={saved + 3}"]))
    straight = trainer.train(compose("train", [f"out_dir={tmp_path / 'straight'}", *args,
                                               f"stop_at_step={saved + 3}"]))
    assert _equal(_weights(straight), _weights(resumed))


def test_feature_parallel_shares_make_the_whole_window():
    """FP ranks each generate every P-th context of a window; their rows together are one process's rows."""
    whole = _windows(_loader(["data.num_workers=0"]), 2)
    parts = []
    for f in range(2):
        loader = _loader(["data.num_workers=0"])
        loader.fp_rank, loader.fp_size = f, 2
        src = loader._open_sources(0)  # this rank's share, before the group's all-gather
        parts.append([src.next(0)[1] for _ in range(2)])
        src.close()
    for k in range(2):
        union = {key: torch.cat([parts[0][k][key], parts[1][k][key]]) for key in whole[k]}
        assert parts[0][k]["ids"].numel() and parts[1][k]["ids"].numel()
        assert _rows([(union["x"], union["y"], union["ids"])]) == _rows([(whole[k]["x"], whole[k]["y"], whole[k]["ids"])])


def test_replicas_read_disjoint_contexts():
    """Two data-parallel replicas' rows come from different contexts, and together from every context."""
    contexts = []
    for r in range(2):
        loader = _loader(["data.num_workers=0"])
        loader.dp_rank, loader.dp_size = r, 2
        contexts.append(set((_windows(loader, 1)[0]["key"] // 16).tolist()))
    assert not contexts[0] & contexts[1]
    assert contexts[0] | contexts[1] == set(range(2 * window_contexts(100, 16)))


def test_feature_parallel_ranks_split_generation_and_equal_one_process(tmp_path):
    args = COMMON + ["steps=4", "data.num_workers=1", "precision=fp32"]
    one = trainer.train(compose("train", args + [f"out_dir={tmp_path / 'one'}"]))
    job = Ranks(2, args + [f"out_dir={tmp_path / 'fp2'}", "parallel.feature_parallel=2"], tmp_path / "logs")
    ended = job.finish(300)
    assert [e.code for e in ended] == [0, 0], [e.stderr[-2000:] for e in ended]
    a, b = _weights(one), _weights(tmp_path / "fp2" / "model")
    # the same rows (the all-gathered window equals one process's, tests above); the weights then differ only
    # by the order the FP partial sums add in (lr=0.01: ~4e-6 on weights of ~0.3)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=2e-5) for k in a)
    metrics = [json.loads(x) for x in (tmp_path / "fp2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_one_generation_feeds_several_dictionaries(tmp_path):
    """K dictionaries on one live stream: each equals its own live run."""
    args = COMMON + ["steps=4", "data.num_workers=1"]
    trainer.train(compose("train", args + [f"out_dir={tmp_path / 'k'}",
                                           "dictionaries=[{model.n_features: 16}, {model.n_features: 8}]"]))
    for name, f in (("clt-F16-ls1", 16), ("clt-F8-ls1", 8)):
        alone = trainer.train(compose("train", args + [f"model.n_features={f}", f"out_dir={tmp_path / name}"]))
        assert _equal(_weights(alone), _weights(tmp_path / "k" / name / "model"))


def test_write_through_shards_hold_the_served_rows(tmp_path):
    out = tmp_path / "written"
    run = trainer.train(compose("train", COMMON + ["steps=5", "data.num_workers=0", f"out_dir={tmp_path / 'r'}",
                                                   f"data.live.write_to={out}"]))
    info = DatasetInfo.load(out)
    assert info.n_tokens > 0 and info.scale_x == json.loads((run / "model.json").read_text())["dataset"]["scale_x"]
    assert json.loads((run / "model.json").read_text())["dataset"]["path"] == str(out)  # clt-eval finds them
    windows = _windows(_loader(["data.num_workers=0"]), len(info.shards))
    assert sum(w["ids"].shape[0] for w in windows) >= 5 * 64  # every window the run served
    whole = [(w["x"][:len(w["x"]) // 16 * 16], w["y"][:len(w["y"]) // 16 * 16], w["ids"][:len(w["ids"]) // 16 * 16])
             for w in windows]
    from_shards = list(ActivationLoader(out, 16, shuffle_buffer=16, normalize=False, num_workers=0, epochs=1))
    assert _rows([(b.x, b.y, b.token_ids) for b in from_shards]) == _rows(whole)
    # and a run trains from them
    trainer.train(compose("train", [f"data.path={out}", "data.heldout_shards=0", "steps=2", "model.n_features=16",
                                    "batch_tokens=64", "logger.mode=disabled", "progress=false", "kernels=dense",
                                    "data.num_workers=0", "data.shuffle_buffer=64", f"out_dir={tmp_path / 's'}"]))


def test_int8_write_through_stores_the_served_rows_quantized_as_harvest_does(tmp_path):
    """data.live.write_dtype=int8 (the reference recipe's --write-through): each window's shard holds its
    served rows quantized per row exactly as clt-harvest's int8 shards, dataset.json says int8, and a run
    trains from them."""
    from cltrain.train.data.format import quantize_rows

    out = tmp_path / "written"
    trainer.train(compose("train", COMMON + ["steps=5", "data.num_workers=0", f"out_dir={tmp_path / 'r'}",
                                             f"data.live.write_to={out}", "data.live.write_dtype=int8"]))
    info = DatasetInfo.load(out)
    assert info.dtype == "int8" and info.quantized and info.n_tokens > 0
    windows = _windows(_loader(["data.num_workers=0"]), len(info.shards))
    for record, window in zip(info.shards, windows):
        samples = [t for _, t, _ in read_samples(str(out / record["name"]))]
        n = len(window["ids"]) // 16 * 16
        assert sum(len(t["token_ids"]) for t in samples) == n == record["n_tokens"]
        for key in ("x", "y"):
            q, scale = quantize_rows(window[key][:n])
            assert torch.equal(torch.cat([t[key] for t in samples]), q)
            assert torch.equal(torch.cat([t[f"{key}_scale"] for t in samples]), scale)
        assert torch.equal(torch.cat([t["token_ids"] for t in samples]), window["ids"][:n])
    trainer.train(compose("train", [f"data.path={out}", "data.heldout_shards=0", "steps=2", "model.n_features=16",
                                    "batch_tokens=64", "logger.mode=disabled", "progress=false", "kernels=dense",
                                    "data.num_workers=0", "data.shuffle_buffer=64", f"out_dir={tmp_path / 's'}"]))
    assert (tmp_path / "s" / "model" / "model.json").is_file()


def test_text_that_runs_out_starts_again_and_says_so(tmp_path, caplog):
    text = tmp_path / "short.txt"
    text.write_text("a short text of a few words.\n\nanother one.\n")
    loader = _loader(["data.num_workers=0", f"data.live.text.source={text}"])
    with caplog.at_level(logging.WARNING):
        it = iter(loader)
        batches = [next(it) for _ in range(3)]
    loader.close()
    assert all(b.x.shape[0] == 64 for b in batches)
    assert any("ran out; starting it again" in r.message for r in caplog.records)


def test_a_generation_process_that_dies_stops_the_run_with_its_name():
    loader = _loader(["data.num_workers=1", "data.timeout=20"])
    it = iter(loader)
    next(it)
    for p in loader._sources.procs:
        p.kill()
    with pytest.raises(DatasetError, match=r"worker 0 \(rank 0\) died with exit code -9"):
        for _ in range(50):
            next(it)
    procs = [] if loader._sources is None else loader._sources.procs
    loader.close()
    assert all(not p.is_alive() for p in procs)


def test_a_window_that_does_not_fit_is_refused_before_allocating(tmp_path):
    with pytest.raises(OutOfMemory, match="out of memory before start"):
        trainer.train(compose("train", COMMON + ["steps=2", "data.shuffle_buffer=1000000000", "data.num_workers=0",
                                                 f"out_dir={tmp_path / 'big'}"]))


def test_resume_with_another_base_model_is_refused_by_name(tmp_path):
    args = COMMON + ["steps=4", "data.num_workers=0", f"out_dir={tmp_path / 'run'}"]
    trainer.train(compose("train", args + ["stop_at_step=2"]))
    with pytest.raises(DatasetError, match=r"data.live.base_model = 'tiny-gpt2'.*trained on 4"):
        trainer.train(compose("train", args + ["resume=true", "data.live.base_model=tiny-gpt2",
                                               "data.live.layers=[0,2]"]))
    with pytest.raises(ConfigError, match="'dataset.digest'"):  # another context: another stream
        trainer.train(compose("train", args + ["resume=true", "data.live.context=32"]))


def test_live_settings_are_checked():
    with pytest.raises(ConfigError, match="'eval_every'"):
        TrainSettings.from_config(compose("train", LIVE + ["eval_every=10"]))
    with pytest.raises(ConfigError, match="'data.path'"):
        TrainSettings.from_config(compose("train", LIVE + ["data.path=/x"]))
    with pytest.raises(ConfigError, match="'data.live.dtype'"):
        TrainSettings.from_config(compose("train", LIVE + ["data.live.dtype=int8"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path (base model on the training device) needs CUDA")
def test_live_on_the_gpu_generates_on_the_training_device_and_resumes(tmp_path):
    args = COMMON + ["steps=4", "device=cuda", "data.num_workers=0", "precision=fp32"]
    a = trainer.train(compose("train", args + [f"out_dir={tmp_path / 'a'}"]))
    trainer.train(compose("train", args + [f"out_dir={tmp_path / 'b'}", "stop_at_step=2"]))
    b = trainer.train(compose("train", args + [f"out_dir={tmp_path / 'b'}", "resume=true"]))
    assert _equal(_weights(a), _weights(b))
