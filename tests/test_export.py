"""clt-export: the circuit-tracer folder, read back by an independent reader written here (not the
exporter's code), reproduces the trained model's reconstructions on RAW activations."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from cltrain.train import export as export_mod
from cltrain.train.clt import CLT, CLTConfig
from cltrain.train.config import compose
from cltrain.train.export import export
from cltrain.train.model_io import clt_state, save_clt

N, D, F = 3, 8, 16


# ----------------------------------------------------------------------------------------------------
# An independent reader of the circuit-tracer layout (written from the format description, docs/design.md section 5)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys()}


def read_circuit_tracer(folder: Path):
    """Returns (config, forward) where forward(x_raw [B, N, D]) -> y_raw_hat [B, N, D]."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    if config["model_kind"] == "cross_layer_transcoder":
        n = len(list(folder.glob("W_enc_*.safetensors")))
        enc = [_tensors(folder / f"W_enc_{i}.safetensors") for i in range(n)]
        dec = [_tensors(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n)]

        def forward(x):
            x = x.double()
            y = torch.stack([enc[t][f"b_dec_{t}"].expand(x.shape[0], -1) for t in range(n)], 1).clone()
            for s in range(n):
                h = x[:, s] @ enc[s][f"W_enc_{s}"].T + enc[s][f"b_enc_{s}"]
                a = h * (h > enc[s][f"threshold_{s}"])  # circuit-tracer's JumpReLU: strict >
                for j in range(dec[s].shape[1]):
                    y[:, s + j] += a @ dec[s][:, j]
            return y
    else:
        assert config["model_kind"] == "transcoder_set"
        n = len(list(folder.glob("layer_*.safetensors")))
        layers = [_tensors(folder / f"layer_{i}.safetensors") for i in range(n)]

        def forward(x):
            x = x.double()
            out = []
            for i, p in enumerate(layers):
                h = x[:, i] @ p["W_enc"].T + p["b_enc"]
                a = h * (h > p["activation_function.threshold"])
                out.append(a @ p["W_dec"] + p["b_dec"])
            return torch.stack(out, 1)
    return config, forward


# ----------------------------------------------------------------------------------------------------
# Fixtures: a "trained" CLT saved with save_clt, with non-trivial per-layer scales


SCALE_X = [0.5, 2.0, 3.0]
SCALE_Y = [4.0, 0.25, 1.5]


def make_clt(**kw) -> CLT:
    g = torch.Generator().manual_seed(0)
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F, **kw), generator=g)
    with torch.no_grad():
        clt.b_enc.copy_(torch.randn(N, F, generator=g) * 0.2)
        clt.b_dec.copy_(torch.randn(N, D, generator=g))
        for w in clt.W_dec:
            w.mul_(10)
        if clt.log_threshold is not None:
            clt.log_threshold.copy_((torch.rand(N, F, generator=g) * 0.3 + 0.01).log())
    return clt.eval()


def save(tmp_path: Path, clt: CLT, name="model", **ds) -> Path:
    dataset = {"model": "tiny-gpt2", "layers": list(range(N)), "n_layers": N, "d_model": D,
               "scale_x": SCALE_X, "scale_y": SCALE_Y, **ds}
    folder = tmp_path / name
    save_clt(folder, clt_state(clt), clt.cfg, {"dataset": dataset, "train": {"steps": 1}})
    return folder


def raw_reference(clt: CLT, x_raw: torch.Tensor) -> torch.Tensor:
    """The model's own reconstruction mapped to raw space: CLT(s_x x_raw) / s_y."""
    sx = torch.tensor(SCALE_X)[None, :, None]
    sy = torch.tensor(SCALE_Y)[None, :, None]
    with torch.no_grad():
        _, y_norm = clt(x_raw * sx)
    return y_norm.double() / sy


def raw_inputs(seed=1, B=64):
    g = torch.Generator().manual_seed(seed)
    # raw activations at their own scale: x_norm = s_x * x_raw should be O(1)
    return torch.randn(B, N, D, generator=g) / torch.tensor(SCALE_X)[None, :, None]


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True], ids=["clt", "plt"])
def test_round_trip_on_raw_activations(tmp_path, per_layer):
    clt = make_clt(per_layer=per_layer)
    out = export(save(tmp_path, clt), tmp_path / "ct")
    config, forward = read_circuit_tracer(out)
    x_raw = raw_inputs()
    ref = raw_reference(clt, x_raw)
    got = forward(x_raw)
    with torch.no_grad():
        active = (clt.encode(x_raw * torch.tensor(SCALE_X)[None, :, None]).acts != 0).float().mean()
    assert 0.05 < active < 0.95, "the test CLT should have some, but not all, features active"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    assert config["model_kind"] == ("transcoder_set" if per_layer else "cross_layer_transcoder")
    assert config["model_name"] == "tiny-gpt2"
    assert config["feature_input_hook"] == "hook_resid_mid"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert "transcoders" not in config  # layer files are found by glob, so the folder can move
    names = sorted(p.name for p in out.iterdir())
    if per_layer:
        assert names == sorted(["config.yaml"] + [f"layer_{i}.safetensors" for i in range(N)])
        with safe_open(str(out / "layer_1.safetensors"), framework="pt") as f:
            assert sorted(f.keys()) == ["W_dec", "W_enc", "activation_function.threshold", "b_dec", "b_enc"]
            assert list(f.get_slice("W_enc").get_shape()) == [F, D]
            assert list(f.get_slice("W_dec").get_shape()) == [F, D]
    else:
        assert names == sorted(["config.yaml"] + [f"W_dec_{i}.safetensors" for i in range(N)]
                               + [f"W_enc_{i}.safetensors" for i in range(N)])
        for i in range(N):
            with safe_open(str(out / f"W_enc_{i}.safetensors"), framework="pt") as f:
                assert sorted(f.keys()) == sorted([f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"])
                assert list(f.get_slice(f"W_enc_{i}").get_shape()) == [F, D]
                assert list(f.get_slice(f"threshold_{i}").get_shape()) == [F]
            with safe_open(str(out / f"W_dec_{i}.safetensors"), framework="pt") as f:
                assert list(f.keys()) == [f"W_dec_{i}"]
                assert list(f.get_slice(f"W_dec_{i}").get_shape()) == [F, N - i, D]


def test_batchtopk_thresholds(tmp_path):
    clt = make_clt(activation="batchtopk", topk=3)
    clt.train()
    with torch.no_grad():
        for seed in range(4):
            clt(raw_inputs(seed) * torch.tensor(SCALE_X)[None, :, None])
    clt.eval()
    cut = clt.batchtopk_threshold.clone()
    assert bool((cut > 0).all())
    out = export(save(tmp_path, clt), tmp_path / "ct")
    for i in range(N):
        with safe_open(str(out / f"W_enc_{i}.safetensors"), framework="pt") as f:
            torch.testing.assert_close(f.get_tensor(f"threshold_{i}"), cut[i].expand(F))
    config, forward = read_circuit_tracer(out)
    assert config["cltrain"]["thresholds"].startswith("batchtopk")
    # The exported JumpReLU keeps roughly k features per token per layer on data like the training data.
    x_raw = raw_inputs(9, B=256)
    with torch.no_grad():
        h = clt.preactivations(x_raw * torch.tensor(SCALE_X)[None, :, None])
    l0 = (h > cut[None, :, None]).float().sum(-1).mean()
    assert 1.5 < l0 < 6


def test_topk_thresholds_from_calibration(tmp_path):
    k = 4
    clt = make_clt(activation="topk", topk=k)
    sx = torch.tensor(SCALE_X)[None, :, None]
    calib = [raw_inputs(s, B=128) * sx for s in range(3)]  # normalized, as the loader gives them
    model_dir = save(tmp_path, clt)
    with pytest.raises(Exception, match="calibration.dataset"):
        export(model_dir, tmp_path / "ct0")
    assert not (tmp_path / "ct0").exists()
    out = export(model_dir, tmp_path / "ct", calibration=calib)
    config, forward = read_circuit_tracer(out)
    with safe_open(str(out / "W_enc_0.safetensors"), framework="pt") as f:
        thr = f.get_tensor("threshold_0")
    assert bool((thr == thr[0]).all())  # one cut per layer
    with torch.no_grad():
        h = clt.preactivations(torch.cat(calib))
    for i in range(N):
        with safe_open(str(out / f"W_enc_{i}.safetensors"), framework="pt") as f:
            t = f.get_tensor(f"threshold_{i}")[0]
        l0 = (h[:, i] > t).float().sum(-1).mean()
        assert abs(l0 - k) < 0.5, f"layer {i}: average L0 {l0} should be near k={k}"


def test_config_entry_point(tmp_path):
    model_dir = save(tmp_path, make_clt())
    cfg = compose("export", [f"model_dir={model_dir}", f"out_dir={tmp_path / 'ct'}", "dtype=bfloat16"])
    out = export_mod.run(cfg)
    with safe_open(str(out / "W_enc_0.safetensors"), framework="pt") as f:
        assert f.get_tensor("W_enc_0").dtype == torch.bfloat16
    cfg = compose("export", [f"model_dir={model_dir}", "dtype=int8"])
    with pytest.raises(ValueError, match="'dtype'"):
        export_mod.run(cfg)
    with pytest.raises(ValueError, match="'model_dir'"):
        export_mod.run(compose("export", []))


# ----------------------------------------------------------------------------------------------------
# Bad input: clear messages naming the file or key; nothing half-written


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        export(tmp_path / "nope", tmp_path / "ct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.json"):
        export(tmp_path / "empty", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_checkpoint_from_another_dataset(tmp_path):
    model_dir = save(tmp_path, make_clt(), scale_x=[1.0, 2.0])  # 2 scales for a 3-layer CLT
    with pytest.raises(ValueError, match=r"model\.json.*dataset\.scale_x"):
        export(model_dir, tmp_path / "ct")
    meta = json.loads((model_dir / "model.json").read_text())
    meta["dataset"]["scale_x"] = SCALE_X
    del meta["dataset"]["scale_y"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dataset.scale_y"):
        export(model_dir, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_existing_output_needs_overwrite(tmp_path):
    model_dir = save(tmp_path, make_clt())
    out = export(model_dir, tmp_path / "ct")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(model_dir, out)
    assert export(model_dir, out, overwrite=True) == out
    with pytest.raises(ValueError, match="out_dir"):  # never replaces the folder it reads from
        export(model_dir, tmp_path, overwrite=True)
    assert (model_dir / "model.json").is_file()


def test_out_of_disk_leaves_nothing(tmp_path, monkeypatch):
    model_dir = save(tmp_path, make_clt())
    old = export(model_dir, tmp_path / "ct")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    real_save, calls = export_mod.save_safetensors, []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(export_mod, "save_safetensors", failing_save)
    with pytest.raises(OSError, match=r"W_enc_1\.safetensors.*No space left"):
        export(model_dir, tmp_path / "ct2")
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        export(model_dir, old, overwrite=True)
    assert not (tmp_path / "ct2").exists()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "model"]  # no temporary folders left

    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(OSError, match=r"ct3.*MiB"):
        export(model_dir, tmp_path / "ct3")
    assert not (tmp_path / "ct3").exists()


def test_reads_run_and_checkpoint_folders(tmp_path):
    """clt-train's layout: RUN/model (final) and RUN/checkpoints/latest naming step-XXXXXX/model."""
    clt = make_clt()
    run = tmp_path / "run"
    save(run / "checkpoints" / "step-000007", clt, name="model")
    (run / "checkpoints" / "latest").write_text("step-000007\n")
    out = export(run, tmp_path / "ct")
    assert export_mod.resolve_model_dir(run) == run / "checkpoints" / "step-000007" / "model"
    assert export_mod.resolve_model_dir(run / "checkpoints" / "step-000007") == \
        run / "checkpoints" / "step-000007" / "model"
    torch.testing.assert_close(read_circuit_tracer(out)[1](raw_inputs()), raw_reference(clt, raw_inputs()),
                               rtol=1e-5, atol=1e-5)


def test_topk_calibration_from_the_training_dataset(tmp_path, make_dataset):
    """With no calibration batches given, a TopK export reads the dataset recorded in model.json."""
    info = make_dataset(n_layers=N, d_model=D, n_tokens=512, shard_tokens=256)
    clt = make_clt(activation="topk", topk=4)
    out = export(save(tmp_path, clt, path=info.path), tmp_path / "ct", calibration_tokens=256)
    config, _ = read_circuit_tracer(out)
    assert config["cltrain"]["thresholds"].startswith("topk cut estimated on 256 tokens")
    with safe_open(str(out / "W_enc_2.safetensors"), framework="pt") as f:
        assert float(f.get_tensor("threshold_2")[0]) > 0
