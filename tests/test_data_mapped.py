"""Local shards read in place (the file mapped, members found by tarfile in seekable mode, sha256 in a
thread) against the streaming path every URL takes (webdataset's iterator over a hashing reader): the
same samples, the same errors naming the shard, the hash checked at the same point."""
import gzip
import hashlib
import os
import re
import tarfile
import threading

import pytest
import torch

from cltrain.train.data import DatasetError, read_shard
from cltrain.train.data.shards import EmptySlot, SampleRef, map_shard

pytestmark = pytest.mark.timeout(120)


def streamed(rec):
    """The same shard file read through the streaming path (a pipe: URL is streamed like any URL)."""
    return dict(rec, url=f"pipe:cat {rec['url']}")


def storages(samples):
    return {s.x.untyped_storage().data_ptr() for s in samples if not isinstance(s, EmptySlot)}


def assert_same(local, stream, rec):
    assert len(local) == len(stream)
    for a, b in zip(local, stream):
        assert type(a) is type(b)
        if isinstance(a, EmptySlot):
            # the same words, apart from the URL and the text of the exception tarfile raised
            def norm(m):
                return re.sub(r" \(\w+: .*\)$", "", m.replace(f"pipe:cat {rec['url']}", rec["url"]))
            assert norm(a.message) == norm(b.message)
            assert a.message.startswith(f"shard {rec['name']} ({rec['url']})")
            continue
        for u, v in zip(a, b):
            assert (u is None) == (v is None)
            if u is not None:
                assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_local_shards_read_in_place_equal_the_streaming_path(make_dataset, dtype):
    info = make_dataset(dtype=dtype)
    for rec in info.shard_records("all"):
        for start, stop in ((0, None), (3, None), (2, 5), (7, 8)):
            local = list(read_shard(rec, info, start, stop))
            stream = list(read_shard(streamed(rec), info, start, stop))
            assert len(local) == (stop or 8) - start
            assert_same(local, stream, rec)
            # views of one mapping of the file; streamed samples are separate byte strings
            assert len(storages(local)) == 1 and len(storages(stream)) == len(stream)
            # for another process (shared=True): local samples by reference, streamed ones in shared memory
            refs = list(read_shard(rec, info, start, stop, shared=True))
            copies = list(read_shard(streamed(rec), info, start, stop, shared=True))
            assert all(isinstance(r, SampleRef) for r in refs) and all(s.x.is_shared() for s in copies)
            mapping = map_shard(refs[0].path, refs[0].ident)
            assert_same([r.view(mapping) for r in refs], copies, rec)


def test_a_shard_replaced_after_the_worker_checked_it_is_refused(make_dataset):
    info = make_dataset()
    rec = info.shard_records("all")[0]
    ref = next(read_shard(rec, info, shared=True))
    data = open(rec["url"], "rb").read()
    os.remove(rec["url"])
    open(rec["url"], "wb").write(data)  # the same bytes, another file
    with pytest.raises(DatasetError, match=f"{re.escape(rec['url'])}: the shard file changed after a loader worker"):
        map_shard(ref.path, ref.ident)


def edit(path, fn):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    with open(path, "wb") as f:
        f.write(bytes(fn(data)))


def member_offsets(path):
    with tarfile.open(path) as t:
        return [(ti.offset, ti.offset_data, ti.size) for ti in t]


def garble_header(k):
    def fn(path):
        head = member_offsets(path)[k][0]
        edit(path, lambda d: d[:head] + os.urandom(512) + d[head + 512:])
    return fn


def cut_inside_data_of(k):
    def fn(path):
        _, data, size = member_offsets(path)[k]
        edit(path, lambda d: d[:data + size // 2])
    return fn


def flip_bit_in_data(path):
    _, data, size = member_offsets(path)[5]

    def fn(d):
        d[data + size - 100] ^= 1  # inside sample 5's tensor data: it still decodes
        return d
    edit(path, fn)


# (what to do to shard 2, its declared sample count change, samples delivered, the message)
BAD = {
    "truncated inside a member": (cut_inside_data_of(4), 0, 4,
                                  r"corrupt or truncated tar after 4 sample\(s\)"),
    "end-of-archive blocks cut": (lambda p: edit(p, lambda d: d[:-1024]), 0, 8,
                                  r"sha256 \w+\.\.\. differs from dataset.json's"),
    "garbled header of sample 3": (garble_header(3), 0, 3, r"holds 3 sample\(s\) but dataset.json says 8"),
    "garbled first header": (garble_header(0), 0, 0, r"corrupt or truncated tar after 0 sample\(s\)"),
    "flipped bit in tensor data": (flip_bit_in_data, 0, 8, r"sha256 \w+\.\.\. differs from dataset.json's"),
    "a sample fewer than declared": (lambda p: None, +1, 8, r"holds 8 sample\(s\) but dataset.json says 9"),
    "a sample more than declared": (lambda p: None, -1, 7, r"holds more samples than dataset.json says \(7"),
    "missing file": (os.remove, 0, 0, r"cannot open \(.*no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_local_shards_fail_as_on_the_streaming_path(make_dataset, case):
    info = make_dataset()
    rec = info.shard_records("all")[2]
    damage, extra, good, msg = BAD[case]
    damage(rec["url"])
    rec["n_tokens"] += extra * info.tokens_per_sample
    n = rec["n_tokens"] // info.tokens_per_sample
    # skip: one slot per declared sample, the good ones first, each bad slot an EmptySlot naming the shard
    # (a missing file is not the same thing through a pipe: cat fails, and the stream just ends)
    paths = (rec,) if case == "missing file" else (rec, streamed(rec))
    local = list(read_shard(rec, info, on_error="skip"))
    if len(paths) == 2:
        assert_same(local, list(read_shard(streamed(rec), info, on_error="skip")), rec)
    assert len(local) == n and sum(not isinstance(s, EmptySlot) for s in local) == good
    if good and case != "garbled first header":
        assert len(storages(local)) == 1  # read in place, not through the streaming fallback
    for s in local[good:]:
        assert re.search(msg, s.message)
    # raise: the good samples come first (the hash is checked when the shard is done), then the error
    for r in paths:
        got = []
        with pytest.raises(DatasetError, match=f"shard {re.escape(rec['name'])} .*{msg}"):
            for s in read_shard(r, info):
                got.append(s)
        assert len(got) == good


def test_a_compressed_local_shard_is_read_by_the_streaming_path(make_dataset, tmp_path):
    info = make_dataset()
    rec = info.shard_records("all")[1]
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(open(rec["url"], "rb").read()))
    gz = dict(rec, url=str(packed), sha256=hashlib.sha256(packed.read_bytes()).hexdigest())
    assert_same(list(read_shard(gz, info)), list(read_shard(rec, info)), rec)


def test_the_hash_thread_ends_with_the_read(make_dataset, monkeypatch):
    import time
    import types

    from cltrain.train.data import shards

    class SlowSha256:  # a hash that takes a while: 1 ms per 4 KB chunk
        def __init__(self):
            self.h = hashlib.sha256()

        def update(self, b):
            time.sleep(1e-3)
            self.h.update(b)

        def hexdigest(self):
            return self.h.hexdigest()
    monkeypatch.setattr(shards._BackgroundSha256, "CHUNK", 4096)
    monkeypatch.setattr(shards, "hashlib", types.SimpleNamespace(sha256=SlowSha256))
    info = make_dataset(d_model=1024, n_tokens=256)  # 1.5 MB shards: about 0.4 s of hashing each
    rec = info.shard_records("all")[0]

    def hashing():
        return [t for t in threading.enumerate() if t.name == "cltrain-sha256"]
    it = read_shard(rec, info)
    next(it)
    assert hashing()
    it.close()  # a consumer that stops in the middle of a shard: its hash is stopped, not left running
    assert not hashing()
    assert len(list(read_shard(rec, info))) == 8 and not hashing()  # and a whole read checks the digest


def test_writing_into_a_sample_leaves_the_file_alone(make_dataset):
    info = make_dataset()
    rec = info.shard_records("all")[0]
    before = open(rec["url"], "rb").read()
    s = next(read_shard(rec, info))
    ref = s.x.clone()
    s.x.zero_()  # the mapping is copy-on-write: this sample's private copy changes, the file does not
    assert open(rec["url"], "rb").read() == before
    again = next(read_shard(rec, info))
    assert torch.equal(again.x, ref) and not torch.equal(again.x, s.x)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_worker_batches_by_reference_equal_in_process_and_streamed_ones(make_dataset, dtype):
    """1 worker sends local samples by reference (the training process maps the shard), streamed ones
    through shared memory; 0 workers reads in process: the same batches, value for value."""
    from cltrain.train.data import ActivationLoader
    info = make_dataset(dtype=dtype)
    kw = dict(batch_tokens=48, epochs=1, shuffle_buffer=80, seed=1, normalize=False)

    def batches(path, workers):
        return list(ActivationLoader(path, num_workers=workers, **kw))
    ref = batches(info.path, 0)
    for got in (batches(info.path, 1), batches(f"pipe:cat {info.path}/{{}}", 1)):
        assert len(got) == len(ref) == 14
        for a, b in zip(ref, got):
            for u, v in zip(a, b):
                assert (u is None) == (v is None) and (u is None or torch.equal(u, v))


def test_shards_hashed_up_front_are_not_hashed_again_unless_the_file_changed(make_dataset, monkeypatch):
    """verify_shards' identities spare the loader a second sha256 of each shard; a shard rewritten
    after the up-front check (another inode) or changed in place (another mtime) is hashed again, and
    its damage is named."""
    from cltrain.train.data import ActivationLoader, verify_shards
    from cltrain.train.data import shards
    info = make_dataset()
    started = []
    original = shards._BackgroundSha256.__init__
    monkeypatch.setattr(shards._BackgroundSha256, "__init__",
                        lambda self, buf: started.append(len(buf)) or original(self, buf))
    verified = verify_shards(info.path, progress=False)["identities"]
    recs = info.shard_records("all")
    assert sorted(verified) == sorted(r["name"] for r in recs)

    def epoch(**kw):
        started.clear()
        return list(ActivationLoader(info.path, 64, epochs=1, shuffle_buffer=64, normalize=False, **kw))
    ref = epoch()
    assert len(started) == len(recs)  # without identities every shard is hashed as it is read
    got = epoch(verified=verified)
    assert started == []  # with them, none
    assert all(torch.equal(u, v) for a, b in zip(ref, got) for u, v in zip(a, b) if u is not None)

    # rewritten with one flipped byte in its last sample (a new file, as tools that save by rename do)
    rec = recs[1]
    data = bytearray(open(rec["url"], "rb").read())
    data[-2048] ^= 0x01
    tmp = rec["url"] + ".tmp"
    open(tmp, "wb").write(bytes(data))
    os.replace(tmp, rec["url"])
    with pytest.raises(DatasetError, match=rf"shard {rec['name']} .*sha256 .* differs from dataset.json"):
        epoch(verified=verified)
    assert len(started) >= 1

    # restored, then verified again: no hash; then changed in place (same inode, new mtime): hashed
    data[-2048] ^= 0x01
    open(tmp, "wb").write(bytes(data))
    os.replace(tmp, rec["url"])
    verified = verify_shards(info.path, progress=False)["identities"]
    epoch(verified=verified)
    assert started == []
    with open(rec["url"], "r+b") as f:
        f.seek(len(data) - 2048)
        f.write(bytes([data[-2048] ^ 0x01]))
    with pytest.raises(DatasetError, match=rf"shard {rec['name']} .*sha256 .* differs from dataset.json"):
        epoch(verified=verified)
