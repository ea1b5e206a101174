"""The loader beyond one layout: raw batches normalized on the consumer's device, int8 shards, positions
moved to another data-parallel size or worker count (reshard_loader_states), epochs."""
import collections
import json
import os

import pytest
import torch

from cltrain.train.data import ActivationLoader, DatasetError, DatasetInfo, read_samples, reshard_loader_states, to_training
from cltrain.train.checkpoint import load_rank_file

pytestmark = pytest.mark.timeout(180)


def ids_of(batches):
    return [i for b in batches for i in b.token_ids.tolist()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize("workers", [0, 1])
def test_raw_batches_normalized_by_the_consumer_equal_the_float32_path(make_dataset, dtype, workers):
    info = make_dataset(dtype=dtype)
    kw = dict(batch_tokens=48, epochs=1, shuffle_buffer=80, seed=2, num_workers=workers)
    ref = list(ActivationLoader(info, **kw))
    raw_loader = ActivationLoader(info, normalize=False, **kw)
    raw = list(raw_loader)
    assert len(raw) == len(ref) == 14  # 640 tokens: 13 full batches and the remainder
    stored = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}[dtype]
    for a, b in zip(ref, raw):
        assert b.x.dtype == b.y.dtype == stored and a.x.dtype == torch.float32
        assert (b.x_scale is not None) == (dtype == "int8")
        assert torch.equal(a.token_ids, b.token_ids)
        x, y = raw_loader.to_training(b)  # on CPU: bit for bit
        assert x.dtype == torch.float32 and torch.equal(x, a.x) and torch.equal(y, a.y)
        x16, y16 = to_training(b, *raw_loader.scales(), dtype=torch.bfloat16, device="cpu")
        assert torch.equal(x16, a.x.to(torch.bfloat16)) and torch.equal(y16, a.y.to(torch.bfloat16))


def test_int8_shards_are_half_the_bytes_and_close_to_bf16(make_dataset):
    ref = make_dataset("bf16", n_layers=2, d_model=256, n_tokens=256, shard_tokens=128)
    q = make_dataset("int8", n_layers=2, d_model=256, n_tokens=256, shard_tokens=128, dtype="int8")
    size = {k: sum(os.path.getsize(r["url"]) for r in v.shard_records("all"))
            for k, v in (("bf16", ref), ("int8", q))}
    assert 0.45 < size["int8"] / size["bf16"] < 0.6  # int8 values plus a float32 scale per row, tar headers
    assert q.scale_x == ref.scale_x and DatasetInfo.load(q.path).dtype == "int8"
    a = torch.cat([b.x for b in ActivationLoader(ref, 64, epochs=1)])
    b = torch.cat([b.x for b in ActivationLoader(q, 64, epochs=1)])
    nmse = float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())
    assert 0 < nmse < 1e-4  # rounding to 1/127 of each row's largest value
    _, t, _ = next(read_samples(q.shard_urls("all")[0]))
    assert t["x"].dtype == torch.int8 and t["x_scale"].shape == (16, 2) and t["x_scale"].dtype == torch.float32


def test_bad_int8_scales_are_named(make_dataset):
    import hashlib

    import webdataset as wds
    from safetensors.torch import save
    info = make_dataset(dtype="int8")
    rec = info.shard_records("all")[1]
    samples = list(read_samples(rec["url"]))
    with open(rec["url"], "wb") as f:
        w = wds.TarWriter(f, encoder=False)
        for j, (name, t, _) in enumerate(samples):
            if j == 2:
                t["x_scale"][0, 1] = float("nan")
            w.write({"__key__": name.split(".")[0], "safetensors": save(t)})
        w.close()
    with open(rec["url"], "rb") as f:
        info.shards[1]["sha256"] = hashlib.sha256(f.read()).hexdigest()
    info.save(info.path)
    with pytest.raises(DatasetError, match=f"shard {rec['name']} .*sample 2 .*'x_scale' holds 1 NaN/Inf/negative"):
        ids_of(ActivationLoader(info.path, 64, epochs=1))
    loader = ActivationLoader(info.path, 64, epochs=1, on_error="skip")
    assert len(ids_of(loader)) == 640 - 16 and loader.skipped == 1


def run_batches(loader, k):
    it = iter(loader)
    out = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    loader.close()
    return out, state


@pytest.mark.parametrize("old_dp,new_dp,steps", [(2, 1, [3, 5]), (2, 3, [4, 4]), (4, 2, [1, 2, 3, 0]), (2, 2, [0, 6])])
def test_reshard_delivers_the_rest_of_the_epoch_exactly_once(make_dataset, old_dp, new_dp, steps):
    info = make_dataset(n_tokens=1280, shard_tokens=128)  # 10 shards of 8 samples of 16 tokens
    old_seen, states = [], []
    for r in range(old_dp):
        loader = ActivationLoader(info, 24, dp_rank=r, dp_size=old_dp, seed=5, shuffle_buffer=70,
                                  num_workers=2 if r % 2 else 0)
        got, state = run_batches(loader, steps[r])
        old_seen += ids_of(got)
        states.append(state)
    new = reshard_loader_states(states, new_dp, info.path)
    assert len(new) == new_dp
    new_seen = []
    for r, state in enumerate(new):
        loader = ActivationLoader(info, 40, dp_rank=r, dp_size=new_dp, seed=5, shuffle_buffer=50,
                                  num_workers=r % 2, epochs=1)
        loader.load_state_dict(json.loads(json.dumps(state)))
        new_seen += ids_of(loader)
        assert loader.epoch == 1
    assert sorted(old_seen + new_seen) == list(range(1280))  # epoch 0: no token twice, none skipped
    # the next epoch follows the new layout's own schedule: again every token once
    nxt = []
    for r, state in enumerate(new):
        loader = ActivationLoader(info, 40, dp_rank=r, dp_size=new_dp, seed=5, shuffle_buffer=50, epochs=2)
        loader.load_state_dict(state)
        nxt += ids_of(loader)
    assert collections.Counter(nxt) == collections.Counter(new_seen + list(range(1280)))


def test_reshard_when_ranks_are_in_different_epochs(make_dataset):
    info = make_dataset(n_tokens=1280, shard_tokens=128)
    kw = dict(seed=1, shuffle_buffer=64)
    a = ActivationLoader(info, 32, dp_rank=0, dp_size=2, **kw)
    n0 = a.epoch_tokens(0) // 32
    seen_a, state_a = run_batches(a, n0 + 2)  # into epoch 1
    assert a.epoch == 1
    b = ActivationLoader(info, 32, dp_rank=1, dp_size=2, **kw)
    seen_b, state_b = run_batches(b, 3)  # still in epoch 0
    seen = ids_of(seen_a) + ids_of(seen_b)
    new = reshard_loader_states([state_a, state_b], 3, info)
    assert all(s["epoch"] == 1 for s in new)
    for r, s in enumerate(new):
        loader = ActivationLoader(info, 32, dp_rank=r, dp_size=3, epochs=2, **kw)
        loader.load_state_dict(s)
        seen += ids_of(loader)
    assert collections.Counter(seen) == collections.Counter(list(range(1280)) * 2)  # epochs 0 and 1, once each


def test_resume_inside_a_resharded_epoch_is_exact(make_dataset):
    info = make_dataset(n_tokens=1280, shard_tokens=128)
    states = [run_batches(ActivationLoader(info, 24, dp_rank=r, dp_size=2, shuffle_buffer=70), 3)[1] for r in range(2)]
    (state,) = reshard_loader_states(states, 1, info)
    kw = dict(batch_tokens=32, shuffle_buffer=48, num_workers=2, epochs=1)
    full = ActivationLoader(info, **kw)
    full.load_state_dict(state)
    ref = list(full)
    first = ActivationLoader(info, **kw)
    first.load_state_dict(state)
    got, mid = run_batches(first, 7)
    assert "leftover" in mid
    second = ActivationLoader(info, **kw)
    second.load_state_dict(mid)
    got += list(second)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.x, b.x)


@pytest.mark.parametrize("change", [dict(num_workers=2), dict(shuffle_buffer=200), dict(batch_tokens=20),
                                    dict(num_workers=1, shuffle_buffer=30)])
def test_resume_with_another_worker_count_or_window(make_dataset, change):
    info = make_dataset()
    kw = dict(batch_tokens=48, num_workers=0, shuffle_buffer=80, seed=1)
    got, state = run_batches(ActivationLoader(info, **kw), 5)
    second = ActivationLoader(info, **dict(kw, epochs=1, **change))
    second.load_state_dict(state)
    rest = ids_of(second)
    assert sorted(ids_of(got) + rest) == list(range(640))


def test_epoch_is_counted(make_dataset):
    info = make_dataset()
    loader = ActivationLoader(info, 64, shuffle_buffer=64)
    assert loader.epoch == 0 and loader.epoch_tokens(0) == 640
    it = iter(loader)
    for _ in range(10):
        next(it)
    assert loader.epoch == 1  # 10 x 64 = one epoch delivered
    next(it)
    assert loader.epoch == 1 and loader.state_dict()["epoch"] == 1
    loader.close()


def test_reshard_refuses_what_cannot_map(make_dataset):
    info = make_dataset()
    s = [ActivationLoader(info, 32, dp_rank=r, dp_size=2).state_dict() for r in range(2)]
    with pytest.raises(ValueError, match="2 state.*dp_size=2|pass every old rank"):
        reshard_loader_states(s[:1], 2, info)
    with pytest.raises(ValueError, match="dp_rank order"):
        reshard_loader_states(s[::-1], 2, info)
    other = dict(s[1], seed=9)
    with pytest.raises(ValueError, match="saved seed=9"):
        reshard_loader_states([s[0], other], 2, info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_raw_batches_to_the_gpu_equal_the_float32_path(make_dataset):
    info = make_dataset()
    kw = dict(batch_tokens=48, epochs=1, shuffle_buffer=80)
    ref = list(ActivationLoader(info, **kw))
    gpu = ActivationLoader(info, normalize=False, device="cuda", **kw)
    for a, b in zip(ref, gpu):
        assert b.x.is_cuda and b.x.dtype == torch.bfloat16
        x, y = gpu.to_training(b)
        torch.testing.assert_close(x.cpu(), a.x, rtol=0, atol=0)
        torch.testing.assert_close(y.cpu(), a.y, rtol=0, atol=0)


def test_reshard_with_skipped_bad_samples(make_dataset):
    """A bad sample inside the partly served window (an empty slot) does not shift what is excluded."""
    from test_data import nan_at, rewrite_shard
    info = make_dataset(n_tokens=1280, shard_tokens=128)
    for index in range(10):  # sample 3 of every shard is bad: every window holds empty slots
        rewrite_shard(info, index, lambda j, t: dict(t, x=nan_at(t["x"])) if j == 3 else t)
    bad = {i for i in range(1280) if (i // 16) % 8 == 3}
    kw = dict(seed=3, shuffle_buffer=70, on_error="skip")
    old_seen, states = [], []
    for r, k in enumerate((1, 2)):
        got, state = run_batches(ActivationLoader(info, 24, dp_rank=r, dp_size=2, **kw), k)
        assert state["offset"] and state["holes"] == [3]  # window 0 (5 slots) is partly served
        old_seen += ids_of(got)
        states.append(state)
    new_seen = []
    for r, s in enumerate(reshard_loader_states(states, 3, info)):
        loader = ActivationLoader(info, 32, dp_rank=r, dp_size=3, epochs=1, **kw)
        loader.load_state_dict(s)
        new_seen += ids_of(loader)
    assert sorted(old_seen + new_seen) == sorted(set(range(1280)) - bad)


def test_a_position_saved_by_the_previous_loader_still_loads(make_dataset):
    """Checkpoints written before this loader version hold version 1 states (no `holes`)."""
    info = make_dataset()
    kw = dict(batch_tokens=48, shuffle_buffer=80, seed=1, epochs=1)
    got, state = run_batches(ActivationLoader(info, **kw), 4)
    assert state["offset"]  # mid-window
    state = {k: v for k, v in state.items() if k != "holes"} | {"version": 1}
    again = ActivationLoader(info, **kw)
    again.load_state_dict(state)
    assert sorted(ids_of(got) + ids_of(again)) == list(range(640))


# ----------------------------------------------------------------------------------------------------
# One shuffle window per feature-parallel group (issue 26): each rank holds 1/P, the group sums the batch


def _fp_group_worker(rank: int, world: int, port: int, path: str, kw: dict, out: str):
    """One rank of a feature-parallel group of `world` ranks (real processes, gloo): iterate the shared
    loader, save its batches, the most samples it held at once, and its position (state_dict)."""
    import torch.distributed as dist

    from cltrain.train.data import loader as loader_mod

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    held = []
    real_gather = loader_mod.ActivationLoader._gather

    def counting_gather(self, window, wid, idx, buf, at):  # the window as this rank holds it
        held.append(sum(s is not None for s in window))
        return real_gather(self, window, wid, idx, buf, at)

    loader_mod.ActivationLoader._gather = counting_gather
    try:
        loader = ActivationLoader(path, fp_group=dist.group.WORLD, fp_rank=rank, fp_size=world, **kw)
        batches = list(loader)
        torch.save({"batches": [tuple(b) for b in batches], "held": max(held), "state": loader.state_dict()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,workers,normalize", [("bfloat16", 0, False), ("bfloat16", 1, False),
                                                     ("int8", 1, False), ("float16", 0, True)])
def test_a_feature_parallel_group_holds_one_window_and_reads_the_same_batches(make_dataset, tmp_path, dtype,
                                                                             workers, normalize):
    """Each rank of an FP group of 2 (and of 3: a window of 5 samples does not split evenly) keeps its
    share of the window's samples, and the batches the group assembles are the unshared loader's, bit
    for bit, in every dtype, with and without worker processes; so is the position it saves."""
    import multiprocessing
    import socket

    info = make_dataset(dtype=dtype)
    kw = dict(batch_tokens=48, epochs=1, shuffle_buffer=80, seed=2, num_workers=workers, normalize=normalize)
    ref_loader = ActivationLoader(info.path, **kw)
    ref = list(ref_loader)
    window_samples = 80 // info.tokens_per_sample
    for world in (2, 3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_fp_group_worker, args=(r, world, port, info.path, kw,
                                                             str(tmp_path / f"w{world}-{r}.pt")))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * world
        for r in range(world):
            got = load_rank_file(tmp_path / f"w{world}-{r}.pt")  # weights_only, numpy's RNG state allowed
            assert got["held"] == -(-window_samples // world) - (r >= window_samples % world > 0)
            assert len(got["batches"]) == len(ref)
            for a, b in zip(ref, got["batches"]):
                for u, v in zip(a, b):
                    assert (u is None and v is None) or (u.dtype == v.dtype and torch.equal(u, v))
            assert got["state"] == ref_loader.state_dict()
