"""Files written whole or not at all, and their sha256: a leaf module (imports nothing of the project).

Every file the project writes goes through a temporary name and a rename (atomic_write_bytes, replace_dir
for folders), so a reader never sees half of one; hashes are streamed (stream_sha256), shared by shards,
checkpoints and models."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes):
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (e.g. disk full) leaves nothing behind
        raise


def umask() -> int:
    try:  # Linux: read it without setting it (os.umask would change it for every thread meanwhile)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def stream_sha256(f, chunk: int = 1 << 22) -> str:
    """The sha256 of what is left to read in binary file `f` (hashlib releases the GIL on large updates,
    so threads hashing files run in parallel)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)


def check_sha256(path: Path, expected: str, source: str):
    """The file's sha256 is `expected` (as `source` records it), else a ValueError naming both."""
    found = file_sha256(path)
    if found != expected:
        raise ValueError(f"{path}: sha256 {found}, {expected} expected ({source}): the file was damaged or "
                         f"replaced after it was written")


def replace_dir(stage: Path, dst: Path):
    """Move a finished folder `stage` to `dst`, replacing an older `dst` only at the very end, so
    readers see the old folder or the new one, never half of either."""
    stage, dst = Path(stage), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(stage, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
