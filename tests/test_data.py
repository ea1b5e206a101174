"""Activation shards and the streaming loader (train/data/)."""
import collections
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cltrain.errors import ConfigError
from cltrain.train.data import (ActivationLoader, DatasetError, DatasetInfo, ShardWriter, check_dataset_matches,
                                read_shard, rr_consumed)

pytestmark = pytest.mark.timeout(120)


def ids_of(loader):
    return torch.cat([b.token_ids for b in loader]).tolist()


def test_format_roundtrip_and_normalization(make_dataset):
    info = make_dataset()
    again = DatasetInfo.load(info.path)
    assert again.to_json() == info.to_json()
    assert again.n_layers == 3 and again.d_model == 8 and again.tokens_per_sample == 16
    assert sum(s["n_tokens"] for s in again.shards) == again.n_tokens == 640
    b = next(iter(ActivationLoader(info.path, 640, epochs=1)))
    assert b.x.dtype == torch.float32 and b.x.shape == (640, 3, 8) and b.y.shape == (640, 3, 8)
    # scales were estimated on these very tokens: E||s x_l|| = sqrt(D) on every layer
    for v in (b.x, b.y):
        torch.testing.assert_close(v.norm(dim=-1).mean(0), torch.full((3,), math.sqrt(8)), rtol=1e-3, atol=0)
    # raw layers differ in scale by construction (x_l ~ (1 + l)), so the scales must too
    assert info.scale_x[0] > 2 * info.scale_x[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_token_once_per_epoch_shuffled(make_dataset, workers):
    info = make_dataset()
    ids = ids_of(ActivationLoader(info, 50, num_workers=workers, epochs=2, shuffle_buffer=64))
    assert sorted(ids[:640]) == list(range(640)) and sorted(ids[640:]) == list(range(640))
    assert ids[:50] != sorted(ids[:50])  # token-level shuffle
    assert ids[:640] != ids[640:]  # each epoch reshuffled


def test_deterministic_and_seeded(make_dataset):
    info = make_dataset()
    a = ids_of(ActivationLoader(info, 64, seed=3, epochs=1))
    assert a == ids_of(ActivationLoader(info, 64, seed=3, epochs=1))
    assert a == ids_of(ActivationLoader(info, 64, seed=3, epochs=1, num_workers=1))  # 0 and 1 worker: same order
    assert a == ids_of(ActivationLoader(info, 64, seed=3, epochs=1, num_workers=1))
    assert a != ids_of(ActivationLoader(info, 64, seed=4, epochs=1))
    b = ids_of(ActivationLoader(info, 64, seed=3, epochs=1, num_workers=2))
    assert b == ids_of(ActivationLoader(info, 64, seed=3, epochs=1, num_workers=2))


@pytest.mark.parametrize("workers,stop", [(0, 3), (0, 10), (2, 7), (2, 13)])
def test_resume_sees_the_same_tokens(make_dataset, workers, stop):
    """Stop after `stop` batches (mid-window, or in the second epoch), restart from state_dict: the
    concatenation equals an uninterrupted run, values included."""
    info = make_dataset()
    kw = dict(batch_tokens=48, num_workers=workers, shuffle_buffer=80, seed=1)
    ref = ActivationLoader(info, **kw)
    it = iter(ref)
    full = [next(it) for _ in range(20)]
    ref.close()
    first = ActivationLoader(info, **kw)
    it = iter(first)
    got = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
    first.close()
    second = ActivationLoader(info, **kw)
    second.load_state_dict(state)
    it = iter(second)
    got += [next(it) for _ in range(20 - stop)]
    second.close()
    for a, b in zip(full, got):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    with pytest.raises(ValueError, match="saved seed=1 but this loader has seed=2"):
        ActivationLoader(info, **dict(kw, seed=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size.*reshard_loader_states"):
        ActivationLoader(info, **dict(kw, dp_size=2)).load_state_dict(state)


def test_two_processes_two_workers_see_every_token_once(make_dataset, tmp_path):
    """2 data-parallel processes x 2 loader workers each, one epoch: every token id exactly once."""
    info = make_dataset(n_tokens=1280)  # 10 shards
    code = textwrap.dedent(f"""
        import json, sys, torch
        from cltrain.train.data import ActivationLoader
        rank = int(sys.argv[1])
        L = ActivationLoader({info.path!r}, 40, dp_rank=rank, dp_size=2, num_workers=2, epochs=1,
                             shuffle_buffer=64, seed=5, timeout=60)
        ids = torch.cat([b.token_ids for b in L]).tolist()
        json.dump({{"ids": ids, "expected": L.epoch_tokens(0)}}, open(sys.argv[2], "w"))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(tmp_path / f"ids{r}.json")])
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=100) == 0
    out = [json.loads((tmp_path / f"ids{r}.json").read_text()) for r in range(2)]
    assert all(o["ids"] and len(o["ids"]) == o["expected"] for o in out)
    seen = collections.Counter(out[0]["ids"] + out[1]["ids"])
    assert seen == collections.Counter(range(1280))
    assert not set(out[0]["ids"]) & set(out[1]["ids"])


def test_heldout_split(make_dataset):
    info = make_dataset()
    train = ids_of(ActivationLoader(info, 64, epochs=1, heldout_shards=1))
    held = ids_of(ActivationLoader(info, 64, epochs=1, heldout_shards=1, split="heldout"))
    assert len(held) == info.shards[-1]["n_tokens"] and sorted(train + held) == list(range(640))
    assert info.shard_urls("heldout", heldout_shards=1) == [str(Path(info.path) / info.shards[-1]["name"])]
    with pytest.raises(DatasetError, match="heldout_shards=5 leaves no shard for training"):
        info.shard_urls("train", heldout_shards=5)


def test_pipe_urls(make_dataset):
    info = make_dataset()
    url = f"pipe:cat {info.path}/{{}}"
    assert DatasetInfo.load(url).shard_urls()[0] == f"cat {info.path}/{info.shards[0]['name']}".join(["pipe:", ""])
    assert sorted(ids_of(ActivationLoader(url, 100, epochs=1, num_workers=1))) == list(range(640))


def test_never_hangs_on_a_stalled_url(make_dataset):
    info = make_dataset()
    folder = str(info.path)
    info.path = f"pipe:sleep 5; cat {folder}/{{}}"  # every shard takes 5 s to start
    for workers in (0, 1):  # URLs are read in a worker process even with 0 workers, for this timeout
        loader = ActivationLoader(info, 100, epochs=1, num_workers=workers, timeout=1.5)
        with pytest.raises(DatasetError, match="delivered nothing for 2 s"):
            ids_of(loader)
        # the stopped worker ended the stalled command too (its shell and the shell's children)
        deadline = time.monotonic() + 2.0
        while _processes_mentioning(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes_mentioning(folder), _processes_mentioning(folder)


def _processes_mentioning(text):
    """(pid, command line) of the processes whose command line contains text (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append((int(entry), cmd))
    return found


def test_dataset_matches_training_config(make_dataset):
    info = make_dataset()
    check_dataset_matches(info, n_layers=3, d_model=8)
    with pytest.raises(ConfigError, match=r"dataset.json: key 'd_model' = 8 but the training config expects 16"):
        check_dataset_matches(info, n_layers=3, d_model=16)


# ----------------------------------------------------------------------------------------------------
# Bad input: each case raises naming the shard, or with on_error=skip is skipped and counted


def rewrite_shard(info, index, mutate, declare_extra=0):
    """Rewrite shard `index`, passing sample j's tensors through mutate(j, tensors) (None drops it)."""
    rec = info.shard_records("all")[index]
    samples = [it for it in read_shard(rec, info)]
    w = ShardWriter(info.path, rec["name"])
    for j, s in enumerate(samples):
        t = mutate(j, dict(x=s.x, y=s.y, token_ids=s.token_ids))
        if t is not None:
            w.add(f"s{j:04d}", **t)
    new = w.close()
    new["n_tokens"] += declare_extra * info.tokens_per_sample
    info.n_tokens += new["n_tokens"] - rec["n_tokens"]
    info.shards[index] = new
    info.save(info.path)
    return rec["name"]


def bad_sample(key, value_fn):
    def mutate(j, t):
        if j == 2:
            t[key] = value_fn(t[key])
        return t
    return mutate


def nan_at(v):
    v = v.clone()
    v[3, 1, 2] = float("nan")
    return v


def inf_at(v):
    v = v.clone()
    v[0, 0, 0] = float("inf")
    return v


BAD_SAMPLES = {
    "shape": (bad_sample("x", lambda v: v[:, :2]), r"'x' has shape \[16, 2, 8\], expected \[T, N, D\] = \[16, 3, 8\]"),
    "dtype": (bad_sample("y", lambda v: v.float()), r"'y' has dtype torch.float32, expected torch.bfloat16"),
    "nan": (bad_sample("x", nan_at), r"'x' holds 1 NaN/Inf"),
    "inf": (bad_sample("y", inf_at), r"'y' holds 1 NaN/Inf"),
    "ids": (bad_sample("token_ids", lambda v: v[:5]), r"'token_ids' is torch.int64 \[5\], expected int64 \[16\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample(make_dataset, case):
    info = make_dataset()
    mutate, msg = BAD_SAMPLES[case]
    name = rewrite_shard(info, 1, mutate)
    with pytest.raises(DatasetError, match=f"shard {name} .*sample 2 .*{msg}"):
        ids_of(ActivationLoader(info.path, 64, epochs=1, num_workers=1))
    loader = ActivationLoader(info.path, 64, epochs=1, on_error="skip")
    ids = ids_of(loader)
    assert loader.skipped == 1 and name in loader.skip_messages[0]
    assert len(ids) == 640 - 16 and len(set(ids)) == len(ids)


def bytes_edit(path, fn):
    data = bytearray(Path(path).read_bytes())
    Path(path).write_bytes(bytes(fn(data)))


def test_truncated_tar(make_dataset):
    info = make_dataset()
    rec = info.shard_records("all")[2]
    bytes_edit(rec["url"], lambda d: d[: len(d) // 2 + 100])
    with pytest.raises(DatasetError, match=f"shard {rec['name']} .*(truncated|holds)"):
        ids_of(ActivationLoader(info.path, 64, epochs=1, num_workers=2))
    loader = ActivationLoader(info.path, 64, epochs=1, on_error="skip")
    ids = ids_of(loader)
    assert 0 < loader.skipped <= 8 and len(ids) == 640 - 16 * loader.skipped
    assert len(set(ids)) == len(ids)


def test_corrupt_tar_header(make_dataset):
    info = make_dataset()
    rec = info.shard_records("all")[0]

    def garble(d):
        d[0:512] = os.urandom(512)
        return d
    bytes_edit(rec["url"], garble)
    with pytest.raises(DatasetError, match=f"shard {rec['name']} .*corrupt or truncated tar"):
        ids_of(ActivationLoader(info.path, 64, epochs=1))
    loader = ActivationLoader(info.path, 64, epochs=1, on_error="skip")
    assert len(ids_of(loader)) == 640 - 128 and loader.skipped == 8


def test_flipped_bits_fail_the_checksum(make_dataset):
    info = make_dataset()
    rec = info.shard_records("all")[3]

    def flip(d):  # inside the last sample's tensor data: it still decodes
        d[-1024 - 40] ^= 1
        return d
    bytes_edit(rec["url"], flip)
    with pytest.raises(DatasetError, match=f"shard {rec['name']} .*sha256 .* differs from dataset.json"):
        ids_of(ActivationLoader(info.path, 64, epochs=1))


def test_dataset_json_disagrees_with_shard(make_dataset):
    info = make_dataset()
    name = rewrite_shard(info, 1, lambda j, t: t, declare_extra=1)  # declares 9 samples, holds 8
    with pytest.raises(DatasetError, match=f"shard {name} .*holds 8 sample\\(s\\) but dataset.json says 9"):
        ids_of(ActivationLoader(info.path, 64, epochs=1))
    loader = ActivationLoader(info.path, 64, epochs=1, on_error="skip")
    assert len(ids_of(loader)) == 640 and loader.skipped == 1


def test_missing_shard(make_dataset):
    info = make_dataset()
    rec = info.shard_records("all")[4]
    os.remove(rec["url"])
    with pytest.raises(DatasetError, match=f"shard {rec['name']} .*missing"):
        ActivationLoader(info.path, 64)
    loader = ActivationLoader(info.path, 64, epochs=1, on_error="skip", num_workers=2)
    assert len(ids_of(loader)) == 512 and loader.skipped == 8
    assert all(rec["name"] in m for m in loader.skip_messages)


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.pop("d_model"), r"missing key\(s\) \['d_model'\]"),
    (lambda d: d.update(scale_x=[1.0]), r"key 'scale_x' = \[1.0\]: expected a list of n_layers=3"),
    (lambda d: d.update(n_tokens=999), r"key 'n_tokens' = 999: expected the sum of the shards' n_tokens, 640"),
    (lambda d: d["shards"][0].update(n_tokens=17), r"key 'shards\[0\].n_tokens' = 17: expected a positive multiple"),
    (lambda d: d.update(dtype="float32"), r"key 'dtype' = 'float32'"),
])
def test_bad_dataset_json(make_dataset, edit, msg):
    info = make_dataset()
    path = Path(info.path) / "dataset.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=f"{path}: {msg}"):
        DatasetInfo.load(info.path)


def test_no_dataset():
    with pytest.raises(DatasetError, match="/nonexistent/dataset.json: cannot read"):
        DatasetInfo.load("/nonexistent")


def test_round_robin_split():
    assert rr_consumed([3, 1, 2], 0) == [0, 0, 0]
    assert rr_consumed([3, 1, 2], 4) == [2, 1, 1]
    assert rr_consumed([3, 1, 2], 5) == [2, 1, 2]
    assert rr_consumed([3, 1, 2], 6) == [3, 1, 2]


def test_a_dead_worker_is_an_error_not_a_hang(make_dataset):
    info = make_dataset()
    loader = ActivationLoader(info, 32, num_workers=1, prefetch=2, shuffle_buffer=16)
    it = iter(loader)
    next(it)
    (worker,) = loader._sources.procs
    worker.kill()  # as the OOM killer would
    with pytest.raises(DatasetError, match="loader worker 0 .* died with exit code -9"):
        for _ in range(100):
            next(it)


def test_nothing_valid_is_an_error_not_a_spin(make_dataset):
    info = make_dataset(n_tokens=256)  # 2 shards
    for r in info.shard_records("all"):
        os.remove(r["url"])
    loader = ActivationLoader(info.path, 32, on_error="skip")  # epochs=None: would loop forever
    with pytest.raises(DatasetError, match="found no valid sample in a whole epoch"):
        next(iter(loader))


def test_shards_are_plain_webdataset(make_dataset):
    """Any WebDataset reader sees one sample per T tokens, its tensors in a .safetensors member."""
    import webdataset as wds
    from safetensors.torch import load
    info = make_dataset()
    samples = list(wds.WebDataset(info.shard_urls("all")[0], shardshuffle=False))
    assert len(samples) == info.shards[0]["n_tokens"] // 16
    t = load(samples[0]["safetensors"])
    assert t["x"].shape == (16, 3, 8) and t["x"].dtype == torch.bfloat16 and t["token_ids"].tolist() == list(range(16))


def test_http_urls(make_dataset):
    """Shards served over HTTP (WebDataset's gopen, through curl) read like local ones."""
    import functools
    import http.server
    import threading
    info = make_dataset()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=info.path)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = DatasetInfo.load(url)
        assert remote.shards == info.shards and remote.shard_urls()[0] == url + info.shards[0]["name"]
        assert sorted(ids_of(ActivationLoader(url, 100, epochs=1, num_workers=1))) == list(range(640))
        remote.path = url + "missing/"
        with pytest.raises(DatasetError, match=f"shard {info.shards[0]['name']} .*missing/"):
            ids_of(ActivationLoader(remote, 100, epochs=1))
    finally:
        server.shutdown()


def test_loader_from_the_data_config_group(make_dataset):
    from cltrain.train.config import compose
    from cltrain.train.data import loader_from_config
    info = make_dataset()
    cfg = compose("train", [f"data.path={info.path}", "data.num_workers=0", "data.heldout_shards=1"])
    loader = loader_from_config(cfg.data, 64, epochs=1)
    assert loader.shuffle_buffer == cfg.data.shuffle_buffer and len(loader.records) == len(info.shards) - 1
    assert len(ids_of(loader)) == 640 - info.shards[-1]["n_tokens"]
    with pytest.raises(ConfigError, match="data.path"):
        loader_from_config(compose("train").data, 64)
