"""Shards: writing (ShardWriter) and reading (read_shard, read_samples, verify_shards) WebDataset tar files.

Writing is webdataset's `TarWriter` (fixed mtime, mode and owner, so a repeated harvest writes
byte-identical shards) over a file object that hashes every byte; `wds.WebDataset(urls)` reads our
shards, and we read what any WebDataset writer writes in this layout.

Reading has two paths and one tar reader, the stdlib's tarfile (webdataset's `tar_file_iterator` is
tarfile in stream mode):
- URLs and pipe: commands are streams: webdataset's iterator over a reader that hashes each 4 MB chunk
  once. Stream mode copies every member through 10 KB reads (30% of the loader's time, measured).
- Local files are read in place: the file is mapped, tarfile in seekable mode reads only the 512-byte
  headers (TarInfo.offset_data and size) and seeks past the data, and each sample is decoded as views
  of the mapping; nothing is copied before the shuffle gather (a loader worker sends a SampleRef,
  file and offsets, and the training process maps the file too). Resuming inside a shard seeks past
  the members before it without touching them.
  sha256 runs over the mapping in a background thread (hashlib releases the GIL on large updates), so
  it overlaps decoding and the gather instead of preceding them.
  A local file whose first header tarfile cannot read in plain seekable mode (compressed, or corrupt)
  takes the streaming path, which reads compressed tars and reports corruption as for any URL.
On both paths a shard's digest is compared when the shard is done, so its samples may already be in a
window (and in batches) when a mismatch is found: the run then fails (on_error="raise") or logs it
(on_error="skip"). To refuse a bad shard before any of its samples is used, hash every shard up front
(`verify_shards`, the trainer's data.verify_upfront, on by default): it returns each file's identity,
and a loader given them (`verified=`) does not hash an unchanged file again, so each shard is hashed
once per run; a file changed since (device, inode, size or mtime) is hashed while streaming as before.
The mapping is copy-on-write, so a caller writing into a sample changes its own copy, not the file. A
shard truncated in place while mapped would kill the reader (SIGBUS): ShardWriter therefore writes
under a temporary name and renames, and a mapped file replaced that way keeps its old contents.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import tarfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors.torch import load as st_load
from tqdm import tqdm

from cltrain.files import stream_sha256
from .format import (SAMPLE_EXT, STORAGE_DTYPES, DatasetError, DatasetInfo, Sample, SampleError, decode_sample,
                     encode_sample, is_url, open_url)

log = logging.getLogger(__name__)

_EXT = SAMPLE_EXT.lstrip(".")  # webdataset names a member KEY.EXT


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)


class _HashingReader:
    """A read-only file object that reads its stream in large chunks, hashes each chunk once, and serves
    tarfile's small reads (10 KB) from it: tarfile's own reads would cost one system call and one hash
    update per 10 KB. str() is the URL (webdataset's iterator puts str(fileobj) into its errors)."""

    CHUNK = 4 << 20

    def __init__(self, f, h, url: str):
        self.f, self.h, self.url = f, h, url
        self.buf, self.pos = b"", 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= len(self.buf):
            self.buf, self.pos = self.f.read(max(n, self.CHUNK) if n >= 0 else -1), 0
            if self.h is not None:
                self.h.update(self.buf)
        if n < 0:
            n = len(self.buf) - self.pos
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def drain(self):
        """Read (and hash) what tarfile left after the end-of-archive blocks."""
        while self.read(1 << 20):
            pass

    def __str__(self):
        return self.url


class ShardWriter:
    """Write samples into folder/NAME.tar under a temporary name; `close()` fsyncs and renames it and
    returns its dataset.json record {name, n_tokens, sha256}. dtype="int8" quantizes x and y per row
    (train/data/format.py); None stores them in the dtype they come in."""

    def __init__(self, folder: str | os.PathLike, name: str, dtype: str | None = None):
        import webdataset as wds  # noqa: PLC0415  (webdataset is slow to import; only writers need it here)
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"ShardWriter: dtype={dtype!r}, expected one of {list(STORAGE_DTYPES)}")
        self.folder, self.name, self.dtype = Path(folder), name, dtype
        self.tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        self._f = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self._tar = wds.TarWriter(_HashingWriter(self._f, self._hash), encoder=False, compress=False, mtime=0.0,
                                  mode=0o444, user="cltrain", group="cltrain")
        self.n_tokens = self.n_samples = self.n_bytes = 0

    def add(self, key: str, x: torch.Tensor, y: torch.Tensor, token_ids: torch.Tensor, **kw):
        data = encode_sample(x, y, token_ids, dtype=self.dtype, **kw)
        self._tar.write({"__key__": key, _EXT: data})
        self.n_tokens += x.shape[0]
        self.n_samples += 1
        self.n_bytes += len(data) + 512

    def close(self) -> dict:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.folder / self.name)
        return {"name": self.name, "n_tokens": self.n_tokens, "sha256": self._hash.hexdigest()}

    def abort(self):
        try:
            try:  # closed first: left open, tarfile's stream flushes into the closed file when collected
                self._tar.close()
            except Exception:
                pass
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class EmptySlot(NamedTuple):
    """A slot of the schedule whose sample is missing or bad (skipped with on_error="skip"): why."""
    message: str


def read_shard(rec: dict, info: DatasetInfo, start: int = 0, stop: int | None = None, on_error: str = "raise",
               verify: bool = True, shared: bool = False) -> Iterator["Sample | SampleRef | EmptySlot"]:
    """One Sample or EmptySlot per slot start..stop-1 of a shard (stop defaults to its n_tokens / T from
    dataset.json). The sha256 is checked when the whole shard is read (start=0, stop=n): samples are
    handed out as they decode, and a mismatch is an error (or a warning with on_error="skip") when the
    shard is done, on both read paths (module docstring). shared=True is for samples handed to another
    process (loader workers): a local shard's checked sample comes as a SampleRef (where its tensors lie
    in the file; the receiver maps the file itself), a streamed one is copied into shared memory. With
    on_error="raise" a bad sample raises DatasetError naming the shard."""
    url, n = rec["url"], rec["n_tokens"] // info.tokens_per_sample
    stop = n if stop is None else min(stop, n)
    where = f"shard {rec['name']} ({url})"

    def problem(msg):
        if on_error == "raise":
            raise DatasetError(f"{where}: {msg}")
        return EmptySlot(f"{where}: {msg}")

    whole = start == 0 and stop == n
    hashing = verify and whole
    try:
        source = _MappedShard.open(url, hashing, rec.get("verified_ident")) if not is_url(url) else None
        if source is None:  # a URL, or a local file that is not a plain tar from its first header on
            source = _StreamedShard(url, hashing)
    except (OSError, ValueError) as e:
        item = problem(f"cannot open ({e})")
        for _ in range(start, stop):
            yield item
        return
    hashing = source.hashing  # False for a file verify_shards hashed in this run and nobody changed since
    i, broken = 0, None
    try:
        try:
            for name, data in source.members():
                if i >= n:
                    broken = (f"holds more samples than dataset.json says ({n} = n_tokens {rec['n_tokens']} / T); "
                              f"the extra ones are ignored")
                    break
                if i < start:  # resuming inside the shard
                    i += 1
                    continue
                if not name.endswith(SAMPLE_EXT):
                    item = problem(f"member {name!r} (sample {i}) is not a {SAMPLE_EXT} sample")
                else:
                    try:
                        if shared and not isinstance(source, _MappedShard):  # one copy, into shared memory
                            buf = torch.empty(len(data), dtype=torch.uint8).share_memory_()
                            buf.copy_(_as_tensor(data))
                            data = buf
                        item = decode_sample(data, info)
                        if shared and isinstance(source, _MappedShard):
                            item = source.ref(item)
                    except SampleError as e:
                        item = problem(f"sample {i} ({name}): {e}")
                i += 1
                yield item
                if i >= stop and not whole:
                    return
            digest = source.digest() if hashing and broken is None else None
        except DatasetError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            broken = f"corrupt or truncated tar after {i} sample(s) ({type(e).__name__}: {e})"
        if broken is None and i < stop:
            broken = (f"holds {i} sample(s) but dataset.json says {n} (n_tokens {rec['n_tokens']}): "
                      f"truncated, or dataset.json disagrees with the shard")
        if broken is None and hashing and digest != rec["sha256"]:
            broken = f"sha256 {digest[:16]}... differs from dataset.json's {rec['sha256'][:16]}..."
        if broken is not None:
            if i < stop:  # the remaining slots stay empty
                item = problem(broken)
                for _ in range(max(i, start), stop):
                    yield item
            elif on_error == "raise":
                raise DatasetError(f"{where}: {broken}")
            else:  # every slot was already delivered (they decoded and passed the checks): report only
                log.warning("%s: %s", where, broken)
    finally:
        try:
            source.close()
        except Exception as e:  # a failed pipe: command reports here; missing data was reported above
            log.warning("%s: closing the stream: %s", where, e)


def _as_tensor(buf) -> torch.Tensor:
    """A uint8 tensor over a buffer, sharing its memory (read only: frombuffer's warning says so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)


class _StreamedShard:
    """A shard read as a stream (any URL): webdataset's tar iterator over a reader that hashes every byte."""

    def __init__(self, url: str, hashing: bool):
        self.stream, self.hashing = open_url(url), hashing
        self.reader = _HashingReader(self.stream, hashlib.sha256() if hashing else None, url)

    def members(self) -> Iterator[tuple[str, bytes]]:
        from webdataset.tariterators import tar_file_iterator  # noqa: PLC0415
        for member in tar_file_iterator(self.reader):
            yield member["fname"], member["data"]

    def digest(self) -> str:
        self.reader.drain()  # the end-of-archive padding counts in the digest
        return self.reader.h.hexdigest()

    def close(self):
        self.stream.close()


# Members webdataset's iterator leaves out, left out here too: metadata such as __meta__ or __x__/...
_SKIP_META = re.compile(r"__[^/]*__($|/)")


class _MappedShard:
    """A local shard read in place: the file is mapped, the stdlib tarfile reader in seekable mode
    finds each member's offset and size from its header (seeking past the data, never reading it), and
    each member is a uint8 tensor view of the mapping. sha256 runs over the mapping in a thread."""

    @classmethod
    def open(cls, path: str, hashing: bool, verified_ident=None) -> "_MappedShard | None":
        """The mapped shard, or None where tarfile cannot read its first header in seekable plain-tar
        mode (a compressed tar, or a corrupt one): the streaming path then reads it (and reports the
        corruption in the words it uses for any URL)."""
        f = open_url(path)
        try:
            try:
                tar = tarfile.open(fileobj=f, mode="r:")
            except tarfile.ReadError:
                f.close()
                return None
            return cls(f, tar, hashing, verified_ident)
        except BaseException:
            f.close()
            raise

    def __init__(self, f, tar: tarfile.TarFile, hashing: bool, verified_ident=None):
        self.f, self.tar, self.ident = f, tar, _file_ident(f.fileno())
        # verify_shards hashed this very file (same device, inode, size and mtime) earlier in the run:
        # hashing it again would only repeat that check, at a sixth of a page-cache read's speed
        self.hashing = hashing and (verified_ident is None or tuple(verified_ident) != self.ident)
        # ACCESS_COPY: pages are the page cache's until written, and a sample the caller modifies in
        # place changes its private copy, not the file (read-only pages would crash it instead).
        self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.buf = torch.frombuffer(self.map, dtype=torch.uint8)  # holds the mapping while views live
        self.hasher = _BackgroundSha256(self.map) if self.hashing else None

    def members(self) -> Iterator[tuple[str, torch.Tensor]]:
        size = len(self.map)
        for ti in self.tar:
            if not ti.isreg() or _SKIP_META.match(ti.name):
                continue
            end = ti.offset_data + ti.size
            if end > size:
                raise tarfile.ReadError(f"member {ti.name!r} ends at byte {end}, past the end of the file ({size} bytes)")
            yield ti.name, self.buf[ti.offset_data:end]

    def ref(self, sample: Sample) -> "SampleRef | Sample":
        """A checked sample of this file by reference: the byte offset, dtype and shape of each tensor.
        (A tensor safetensors did not align to its dtype was copied by decode_sample: such a sample
        goes into shared memory instead.)"""
        if any(t is not None and t.untyped_storage().data_ptr() != self.buf.data_ptr() for t in sample):
            return Sample(*(None if t is None else t.clone().share_memory_() for t in sample))
        return SampleRef(self.f.name, self.ident, tuple(
            None if t is None else (t.storage_offset() * t.element_size(), str(t.dtype), tuple(t.shape))
            for t in sample))

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def close(self):
        if self.hasher is not None:
            self.hasher.cancel()
        self.tar.close()
        self.f.close()
        # The mapping itself is released when the last sample viewing it is freed.


def _file_ident(fd: int) -> tuple:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class SampleRef(NamedTuple):
    """A sample a loader worker checked, by reference: the shard file and, per Sample field, (byte
    offset in the file, dtype, shape) or None. The training process maps the file itself
    (`map_sample`): the bytes stay in the page cache, with no copy into shared memory on the way."""
    path: str
    ident: tuple  # (st_dev, st_ino, st_size, st_mtime_ns) of the file the worker checked
    tensors: tuple

    def span(self) -> tuple[int, int]:
        """(first byte, end byte) of the sample's tensors in the file."""
        ends = [(at, at + math.prod(shape) * torch.empty((), dtype=_dtype(dtype)).element_size())
                for at, dtype, shape in (t for t in self.tensors if t is not None)]
        return min(a for a, _ in ends), max(b for _, b in ends)

    def view(self, mapping: torch.Tensor, base: int = 0) -> Sample:
        """The sample's tensors over `mapping`, a mapping of the file from byte `base` on."""
        out = []
        for t in self.tensors:
            if t is None:
                out.append(None)
                continue
            at, dtype, shape = t
            dtype = _dtype(dtype)
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out.append(mapping[at - base:at - base + n].view(dtype).view(shape))
        return Sample(*out)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def map_sample(ref: SampleRef) -> Sample:
    """The sample over a copy-on-write mapping of its own bytes only (not the whole shard: a process then
    maps, and the kernel's RLIMIT_DATA counts, only the samples it keeps), if the file is still the one
    a worker checked (the same inode, size and mtime); DatasetError otherwise."""
    lo, hi = ref.span()
    base = lo - lo % mmap.ALLOCATIONGRANULARITY
    with open(ref.path, "rb") as f:
        if _file_ident(f.fileno()) != tuple(ref.ident):
            raise DatasetError(f"{ref.path}: the shard file changed after a loader worker checked it "
                               f"(rewritten while training reads it?)")
        mapping = torch.frombuffer(mmap.mmap(f.fileno(), hi - base, offset=base, access=mmap.ACCESS_COPY),
                                   dtype=torch.uint8)
    return ref.view(mapping, base)


def map_shard(path: str, ident: tuple) -> torch.Tensor:
    """The whole file as a uint8 tensor over a copy-on-write mapping, if it is still the file a worker
    checked (the same inode, size and mtime); DatasetError otherwise."""
    with open(path, "rb") as f:
        if _file_ident(f.fileno()) != tuple(ident):
            raise DatasetError(f"{path}: the shard file changed after a loader worker checked it "
                               f"(rewritten while training reads it?)")
        return torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)


class _BackgroundSha256:
    """sha256 of a buffer, computed in a thread while the caller decodes and gathers samples: hashlib
    releases the GIL on updates this large, so the hash takes a core of its own where one is free."""

    CHUNK = 16 << 20

    def __init__(self, buf):
        self.h, self.stopped = hashlib.sha256(), False
        self.thread = threading.Thread(target=self._run, args=(buf,), name="cltrain-sha256", daemon=True)
        self.thread.start()

    def _run(self, buf):
        with memoryview(buf) as view:  # slices of a memoryview are views: nothing is copied
            for at in range(0, len(view), self.CHUNK):
                if self.stopped:
                    break
                self.h.update(view[at:at + self.CHUNK])

    def hexdigest(self) -> str:
        self.thread.join()
        return self.h.hexdigest()

    def cancel(self):
        self.stopped = True
        self.thread.join()


def read_samples(url: str) -> Iterator[tuple[str, dict[str, torch.Tensor], dict]]:
    """(member name, tensors, provenance dict) of every sample of one shard, unchecked: for inspection and tests."""
    from webdataset.tariterators import tar_file_iterator  # noqa: PLC0415
    with open_url(url) as f:
        for member in tar_file_iterator(f):
            data = member["data"]
            n = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, data
            meta = json.loads(json.loads(data[8:8 + n]).get("__metadata__", {}).get("provenance", "{}"))
            yield member["fname"], st_load(data), meta


def _file_sha256(path: str) -> tuple[str, tuple | None]:
    """(sha256, the file's identity) -- the identity None if the file changed while it was hashed."""
    with open(path, "rb") as f:
        before = _file_ident(f.fileno())
        digest = stream_sha256(f)
        after = _file_ident(f.fileno())
    return digest, before if before == after else None


def verify_shards(dataset, split: str = "all", heldout_shards: int = 0, threads: int | None = None,
                  progress: bool = True) -> dict:
    """Check the sha256 of every local shard of a split against dataset.json before training starts, in
    parallel threads with a progress bar. Raises DatasetError naming the first bad shard (missing, or
    expected vs found digest) and how many others are bad. Shards behind URLs are not downloaded for
    this (the loader checks them as it streams them). Returns {"checked": [names], "remote": [names],
    "identities": {name: (device, inode, size, mtime_ns)}} -- the identities of the files hashed, which
    ActivationLoader(verified=) takes so that it does not hash an unchanged file a second time."""
    info = DatasetInfo.load(dataset)
    recs = info.shard_records(split, heldout_shards)
    local = [r for r in recs if not is_url(r["url"])]
    remote = [r["name"] for r in recs if is_url(r["url"])]
    threads = threads or min(8, os.cpu_count() or 1)
    bad, identities = [], {}

    def check(r):
        try:
            found, ident = _file_sha256(r["url"])
        except OSError as e:
            return r, f"cannot read ({e.strerror or e})"
        if found != r["sha256"]:
            return r, f"sha256 is {found} but dataset.json expects {r['sha256']}"
        if ident is not None:
            identities[r["name"]] = ident
        return r, None

    total = sum(os.path.getsize(r["url"]) for r in local if os.path.isfile(r["url"]))
    with ThreadPoolExecutor(threads) as pool, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                                   desc=f"sha256 of {len(local)} shard(s)", dynamic_ncols=True) as bar:
        for r, msg in pool.map(check, local):
            if msg:
                bad.append(f"shard {r['name']} ({r['url']}): {msg}")
            bar.update(os.path.getsize(r["url"]) if os.path.isfile(r["url"]) else 0)
    if bad:
        more = f" ({len(bad) - 1} more bad shard(s), e.g. {bad[1]})" if len(bad) > 1 else ""
        raise DatasetError(f"{bad[0]}{more}; listed in {info.json_path}")
    return {"checked": [r["name"] for r in local], "remote": remote, "identities": identities}
