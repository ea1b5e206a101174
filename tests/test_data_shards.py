"""Shards on webdataset's own pieces, the up-front sha256 check, int8 from clt-harvest, and loader workers
that die with their parent."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cltrain.train.data import (ActivationLoader, DatasetError, DatasetInfo, ShardWriter, read_samples, read_shard,
                                verify_shards)

pytestmark = pytest.mark.timeout(180)


def test_webdataset_reads_our_shards_and_we_read_webdatasets(make_dataset, tmp_path):
    import webdataset as wds
    from safetensors.torch import load
    info = make_dataset()
    urls = info.shard_urls("all")
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 640 // 16
    ids = [i for s in samples for i in load(s["safetensors"])["token_ids"].tolist()]
    assert sorted(ids) == list(range(640))
    # a shard written by webdataset's TarWriter with its defaults (current mtime, its user names) reads the same
    rec = info.shard_records("all")[0]
    with open(tmp_path / "plain.tar", "wb") as f:
        w = wds.TarWriter(f, encoder=False)
        for name, t, _ in read_samples(rec["url"]):
            from safetensors.torch import save
            w.write({"__key__": name.split(".")[0], "safetensors": save(t)})
        w.close()
    ours = [s.token_ids.tolist() for s in read_shard(rec, info)]
    theirs = [s.token_ids.tolist() for s in read_shard(dict(rec, url=str(tmp_path / "plain.tar")), info, verify=False)]
    assert ours == theirs


def test_shards_are_reproducible(tmp_path):
    def write(folder):
        folder.mkdir()
        w = ShardWriter(folder, "s-000000.tar", dtype="int8")
        g = torch.Generator().manual_seed(0)
        for i in range(3):
            w.add(f"k{i}", torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 8, generator=g), torch.arange(4))
        return w.close()
    a, b = write(tmp_path / "a"), write(tmp_path / "b")
    assert a == b and a["n_tokens"] == 12
    data = (tmp_path / "a" / "s-000000.tar").read_bytes()
    assert hashlib.sha256(data).hexdigest() == a["sha256"]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left


def test_verify_shards_names_the_bad_shard(make_dataset):
    info = make_dataset()
    assert len(verify_shards(info.path, progress=False)["checked"]) == 5
    recs = info.shard_records("all")
    data = bytearray(open(recs[3]["url"], "rb").read())
    data[-2000] ^= 1
    open(recs[3]["url"], "wb").write(bytes(data))
    found = hashlib.sha256(data).hexdigest()
    with pytest.raises(DatasetError, match=f"shard {recs[3]['name']} .*sha256 is {found} but dataset.json "
                                           f"expects {recs[3]['sha256']}"):
        verify_shards(info, progress=False)
    os.remove(recs[1]["url"])
    with pytest.raises(DatasetError, match=f"shard {recs[1]['name']} .*cannot read.*1 more bad shard"):
        verify_shards(info, progress=False)
    # the training split only: the held-out last shard is not looked at
    assert len(verify_shards(make_dataset("ok"), split="train", heldout_shards=1, progress=False)["checked"]) == 4


def test_harvest_writes_int8_shards(tmp_path):
    from cltrain.train import harvest as harvest_mod
    from cltrain.train.config import compose
    base = ["base_model=tiny-gpt2", "max_tokens=1024", "context=64", "batch_size=4", "tokens_per_sample=16",
            "shard_tokens=256", "shuffle_buffer=512", "scale_tokens=300", "threads=1"]
    ref = harvest_mod.harvest(compose("harvest", base + [f"out_dir={tmp_path / 'bf16'}"]))
    q = harvest_mod.harvest(compose("harvest", base + [f"out_dir={tmp_path / 'int8'}", "dtype=int8"]))
    assert q.dtype == "int8" and q.n_tokens == ref.n_tokens and q.scale_x == ref.scale_x
    a = torch.cat([b.x for b in ActivationLoader(ref, 128, epochs=1)])
    b = torch.cat([b.x for b in ActivationLoader(q, 128, epochs=1)])
    assert 0 < float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()) < 1e-3  # same tokens, rounded
    est = harvest_mod.estimate(compose("harvest", base + ["dtype=int8"]), 4, 32)
    assert est["bytes_per_token"] == 2 * 4 * 32 + 2 * 4 * 4 + 32


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_die_with_a_killed_parent(make_dataset, tmp_path):
    info = make_dataset()
    code = textwrap.dedent(f"""
        import sys, time
        from cltrain.train.data import ActivationLoader
        loader = ActivationLoader({info.path!r}, 16, num_workers=2, shuffle_buffer=16, prefetch=1)
        it = iter(loader)
        next(it)
        print(" ".join(str(p.pid) for p in loader._sources.procs), flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(alive(p) for p in workers)
    os.kill(parent.pid, signal.SIGKILL)  # as the OOM killer or a launcher would
    parent.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "loader workers outlived their parent"


def test_the_dataset_json_dtype_is_checked(make_dataset):
    info = make_dataset()
    doc = info.to_json()
    doc["dtype"] = "float8"
    with pytest.raises(DatasetError, match=r"key 'dtype' = 'float8': expected one of \['bfloat16', 'float16', 'int8'\]"):
        DatasetInfo.from_json(doc)
