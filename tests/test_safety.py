"""What a user is handed runs no code, and no run loses another's work (docs/operations.md, "Files from
elsewhere"): planted pickle payloads, shard names that a path or a shell would read differently, two runs in
one folder, a fresh run over a finished one, export's overwrite, damaged and drifted files, NaN weights.
"""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cltrain.train import export as export_mod
from cltrain.train import trainer
from cltrain.train.checkpoint import CheckpointError, read_trainer_state
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.data import ActivationLoader, DatasetError, DatasetInfo, write_synthetic_dataset
from cltrain.train.data.format import join_url
from cltrain.train.evaluate import evaluate
from cltrain.train.model_io import ModelReader, load_clt
from ranks import Ranks, wait_for_step

pytestmark = pytest.mark.timeout(600)

COMMON = ["model.n_features=16", "batch_tokens=64", "log_every=1", "logger.mode=disabled", "progress=false",
          "data.num_workers=0", "data.shuffle_buffer=256", "data.heldout_shards=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "ds"
    write_synthetic_dataset(path, n_layers=3, d_model=8, n_tokens=2048, tokens_per_sample=16, shard_tokens=256,
                            seed=5)
    return path


def _cfg(data, out, *extra):
    return compose("train", [f"data.path={data}", f"out_dir={out}", *COMMON, "steps=4", "checkpoint_every=2",
                             *extra])


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4, OUT/model)."""
    out = tmp_path_factory.mktemp("run") / "out"
    trainer.train(_cfg(data, out))
    return out


class Payload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint or shard would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _record(checkpoint: Path, name: str):
    """Make trainer.json's manifest agree with the planted file (size and sha256), as an attacker would."""
    state = json.loads((checkpoint / "trainer.json").read_text())
    f = checkpoint / name
    state["files"][name] = {"bytes": f.stat().st_size, "sha256": _sha(f)}
    (checkpoint / "trainer.json").write_text(json.dumps(state))


# ----------------------------------------------------------------------------------------------------
# Code execution


def test_a_payload_in_any_checkpoint_file_never_runs(data, run, tmp_path):
    marker = tmp_path / "PWNED"
    blob = pickle.dumps(Payload(marker))
    files = sorted(str(p.relative_to(run / "checkpoints" / "step-000004"))
                   for p in (run / "checkpoints" / "step-000004").rglob("*") if p.is_file())
    assert "ranks/rank-00000.pt" in files and "model/model.json" in files
    for name in files:
        ck = _copy(run / "checkpoints" / "step-000004", tmp_path / name.replace("/", "_") / "step-000004")
        target = ck / name
        if name.endswith(".pt"):
            torch.save({"loader": Payload(marker)}, target)  # the realistic form: torch.save's own zip
        else:
            target.write_bytes(blob)
        if name != "trainer.json":
            _record(ck, name)
        with pytest.raises((CheckpointError, ConfigError)) as e:
            trainer.train(_cfg(data, tmp_path / name.replace("/", "_") / "out", "resume=" + str(ck)))
        assert not marker.exists(), f"the payload in {name} ran"
        assert str(ck) in str(e.value), f"{name}: {e.value}"
    # the rank file is refused by the safe unpickler itself, named, with nothing run
    ck = tmp_path / "ranks_rank-00000.pt" / "step-000004"
    with pytest.raises(CheckpointError, match="not a rank file this version can read safely"):
        trainer.train(_cfg(data, tmp_path / "again", "resume=" + str(ck)))


def test_a_payload_in_a_model_or_dataset_file_never_runs(data, run, tmp_path):
    marker = tmp_path / "PWNED"
    blob = pickle.dumps(Payload(marker))
    for name in sorted(p.name for p in (run / "model").iterdir()):
        model = _copy(run / "model", tmp_path / f"model-{name}")
        (model / name).write_bytes(blob)
        if name != "model.json":  # the index records the planted file's hash, so the parser itself sees it
            meta = json.loads((model / "model.json").read_text())
            for s in meta["weights"]["shards"]:
                s["sha256"] = _sha(model / s["file"])
            (model / "model.json").write_text(json.dumps(meta))
        for job in (lambda: evaluate(model, dataset=data, out_dir=tmp_path / f"eval-{name}", replacement=False),
                    lambda: export_mod.export(model, tmp_path / f"export-{name}")):
            with pytest.raises((ValueError, OSError)):
                job()
            assert not marker.exists(), f"the payload in model/{name} ran"
    ds = _copy(data, tmp_path / "ds")
    shard = DatasetInfo.load(str(ds)).shards[0]["name"]
    (ds / shard).write_bytes(blob)
    doc = json.loads((ds / "dataset.json").read_text())
    doc["shards"][0]["sha256"] = _sha(ds / shard)
    (ds / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=shard):
        for _ in ActivationLoader(str(ds), 64, shuffle_buffer=64, on_error="raise", verify=True):
            pass
    (ds / "dataset.json").write_bytes(blob)
    with pytest.raises(DatasetError, match="dataset.json"):
        DatasetInfo.load(str(ds))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["synthetic-000000.tar;touch {marker};echo", "../other/synthetic-000000.tar",
                                  "/etc/passwd.tar", "$(touch {marker}).tar", "a b.tar", ".hidden.tar"])
def test_shard_names_are_plain_file_names_checked_before_anything_opens(data, tmp_path, name):
    marker = tmp_path / "TOUCHED"
    ds = _copy(data, tmp_path / "ds")
    doc = json.loads((ds / "dataset.json").read_text())
    doc["shards"][0]["name"] = name.format(marker=marker)
    (ds / "dataset.json").write_text(json.dumps(doc))
    for path in (str(ds), f"pipe:cat {ds}/{{}}"):
        with pytest.raises(DatasetError, match=r"shards\[0\]\.name") as e:
            ActivationLoader(path, 64, shuffle_buffer=64)
        assert "dataset.json" in str(e.value)
    assert not marker.exists()


def test_pipe_urls_get_the_name_shell_quoted():
    assert join_url("pipe:cat /d/{} | head", "a-000001.tar") == "pipe:cat /d/a-000001.tar | head"
    assert join_url("pipe:cat /d/{}", "it's.tar") == "pipe:cat /d/'it'\"'\"'s.tar'"


# ----------------------------------------------------------------------------------------------------
# Work lost


def test_a_second_run_into_a_busy_folder_stops_at_once_naming_the_first(data, tmp_path):
    out = tmp_path / "out"
    first = Ranks(1, [f"data.path={data}", f"out_dir={out}", *COMMON, "steps=100000", "checkpoint_every=1000000"],
                  tmp_path / "first")
    try:
        wait_for_step(out, 2, first.alive)
        second = Ranks(1, [f"data.path={data}", f"out_dir={out}", *COMMON, "steps=3", "resume=true"],
                       tmp_path / "second").finish(120)[0]
        assert second.code == 2, second.stderr
        assert f"{out}: another run is using this folder (host " in second.stderr
        assert f"PID {first.pids[0]}" in second.stderr and "delete" in second.stderr
        assert first.alive()
    finally:
        os.kill(first.pids[0], signal.SIGKILL)
        first.finish(60)
    # the killed run's lock is stale: the next run takes it over and says so
    third = Ranks(1, [f"data.path={data}", f"out_dir={out}", *COMMON, "steps=3", "resume=true"],
                  tmp_path / "third").finish(120)[0]
    assert third.code == 0, third.stderr
    assert f"(PID {first.pids[0]}, started" in third.stdout and "is gone; lock taken over" in third.stdout
    assert not (out / ".cltrain.lock").exists()


def test_a_fresh_run_never_lands_on_a_finished_one(data, tmp_path):
    out = tmp_path / "out"
    trainer.train(_cfg(data, out, "steps=6"))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="holds another run .*pass resume=true to continue it, overwrite=true"):
        trainer.train(_cfg(data, out, "steps=2", "checkpoint_every=1"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert ModelReader(out / "model").meta["train"]["step"] == 6
    trainer.train(_cfg(data, out, "steps=2", "checkpoint_every=1", "overwrite=true"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]
    assert ModelReader(out / "model").meta["train"]["step"] == 2
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(ConfigError, match="'overwrite'"):
        trainer.train(_cfg(data, out, "overwrite=true", "resume=true"))


def test_export_overwrite_replaces_only_an_export(data, run, tmp_path):
    out = export_mod.export(run / "model", tmp_path / "export")
    assert export_mod.export(run / "model", out, overwrite=True) == out
    assert oct(os.stat(out / "W_enc_0.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())
    victim = _copy(data, tmp_path / "precious")
    for folder in (victim, run / "model"):
        with pytest.raises((FileExistsError, ConfigError), match="overwrite|model folder"):
            export_mod.export(run / "model", folder, overwrite=True)
    assert sorted(p.name for p in victim.iterdir()) == sorted(p.name for p in data.iterdir())
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="also holds notes.txt"):
        export_mod.export(run / "model", out, overwrite=True)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_config_error_touches_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "cltrain.train.trainer", f"out_dir={out}", "seed=abc"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "config key 'seed'" in p.stderr
    assert not out.exists() and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# Damage and drift


def _flip(path: Path, at: int):
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def test_damaged_checkpoint_files_are_named_with_expected_and_found(data, run, tmp_path):
    ck = _copy(run / "checkpoints" / "step-000004", tmp_path / "a" / "step-000004")
    rank = ck / "ranks" / "rank-00000.pt"
    rank.write_bytes(os.urandom(rank.stat().st_size))
    with pytest.raises(CheckpointError, match=rf"{rank}: sha256 [0-9a-f]{{64}}, [0-9a-f]{{64}} expected"):
        trainer.train(_cfg(data, tmp_path / "a" / "out", f"resume={ck}"))
    ck = _copy(run / "checkpoints" / "step-000004", tmp_path / "b" / "step-000004")
    weights = next((ck / "model").glob("weights-*.safetensors"))
    _flip(weights, weights.stat().st_size - 3)
    with pytest.raises(CheckpointError, match=rf"{weights}: sha256 .* expected"):
        trainer.train(_cfg(data, tmp_path / "b" / "out", f"resume={ck}"))
    model = _copy(run / "model", tmp_path / "model")
    weights = next(model.glob("weights-*.safetensors"))
    _flip(weights, weights.stat().st_size - 3)
    with pytest.raises(ValueError, match=rf"{weights}: sha256 .* expected"):
        load_clt(model)
    p = subprocess.run([sys.executable, "-m", "cltrain.train.evaluate", f"model_dir={model}", f"dataset={data}",
                        "replacement.enabled=false", "logger.mode=disabled", f"out_dir={tmp_path / 'eval'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and f"{weights}: sha256" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_resuming_on_another_dataset_of_the_same_shape_needs_saying_so(data, run, tmp_path, capsys):
    other = tmp_path / "other"
    write_synthetic_dataset(other, n_layers=3, d_model=8, n_tokens=2048, tokens_per_sample=16, shard_tokens=256,
                            seed=6)
    out = _copy(run, tmp_path / "out")
    step2 = out / "checkpoints" / "step-000002"
    with pytest.raises(ConfigError, match="'dataset.digest' = .*another dataset of the same shape"):
        trainer.train(_cfg(other, out, f"resume={step2}"))
    trainer.train(_cfg(other, out, f"resume={step2}", "data.allow_change_on_resume=true"))
    assert f"clt-train: resuming {step2} on another dataset (digest " in capsys.readouterr().out
    assert read_trainer_state(out / "checkpoints" / "step-000004")["fingerprint"]["dataset.digest"] == \
        DatasetInfo.load(str(other)).digest() != DatasetInfo.load(str(data)).digest()


def test_non_finite_weights_are_refused_naming_tensor_and_layer(data, run, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy(run / "model", tmp_path / "model")
    shard = next(model.glob("weights-*.safetensors"))
    tensors = load_file(shard)
    tensors["W_enc"][2, 5, 1] = float("nan")
    save_file(tensors, shard)
    meta = json.loads((model / "model.json").read_text())
    meta["weights"]["shards"][0]["sha256"] = _sha(shard)
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tensor W_enc layer 2 has 1 non-finite values"):
        load_clt(model)
    with pytest.raises(ValueError, match="tensor W_enc layer 2 has 1 non-finite"):
        export_mod.export(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------------------------------
# Exactness


def test_the_compiled_cpu_kernels_give_the_same_bits_for_any_thread_split():
    """Each output row (feature, token) is summed by one thread in a fixed order, so the split of rows over
    threads (by entry count) changes no bit: 1, 2, 3 and 7 threads on ragged rows equal each other."""
    from cltrain.kernels import cpu_native

    if not cpu_native.available():
        pytest.skip(f"no compiled CPU kernels here: {cpu_native.failure()}")
    g = torch.Generator().manual_seed(0)
    F, B, K = 301, 257, 1100  # K over one cache block (1024) and ragged; rows of 0 to ~60 entries
    mask = torch.rand(F, B, generator=g) < torch.rand(F, 1, generator=g) * 0.25
    ptr = torch.zeros(F + 1, dtype=torch.int64)
    ptr[1:] = mask.sum(1).cumsum(0)
    idx = mask.nonzero()[:, 1].contiguous()
    vals = torch.randn(idx.numel(), generator=g)
    W, Y, D = (torch.randn(F, K, generator=g), torch.randn(B, K, generator=g), torch.randn(B, K, generator=g))
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            s = torch.empty(idx.numel())
            assert cpu_native.sampled_product(W, Y, ptr, idx, s)
            c = torch.randn(F, K, generator=torch.Generator().manual_seed(1))
            assert cpu_native.csr_dense(ptr, idx, vals, D, c, accumulate=True)
            outs.append((s, c))
    finally:
        torch.set_num_threads(threads)
    for s, c in outs[1:]:
        assert torch.equal(s, outs[0][0]) and torch.equal(c, outs[0][1])
