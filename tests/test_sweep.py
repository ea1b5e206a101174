"""Sweeps: an executed multirun through Hydra's CLI (folders, names, resubmission, the sweep table), the
SLURM launcher's sbatch parameters, several dictionaries per data pass, and bad sweep input."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from cltrain import names, rank_env
from cltrain.train import lifecycle, trainer
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.data import write_synthetic_dataset
from cltrain.train.model_io import ModelReader

pytestmark = pytest.mark.timeout(300)

TINY = ["steps=4", "batch_tokens=32", "checkpoint_every=100", "log_every=2", "logger.mode=disabled",
        "progress=false", "data.num_workers=0", "data.shuffle_buffer=128", "data.heldout_shards=1",
        "data.verify_upfront=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "acts"
    write_synthetic_dataset(path, n_layers=2, d_model=8, n_tokens=1024, tokens_per_sample=16,
                            shard_tokens=256, seed=0)
    return path


def _cli(args, cwd, module="cltrain.train.trainer"):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # in-process runs of other tests left this process's rendezvous (its port is still held) in os.environ
    for key in (names.SWEPT_ENV, "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def weights(model_dir):
    reader = ModelReader(model_dir)
    return {k: reader.tensor(k) for k in reader.expected_shapes()}


def test_multirun_through_hydra_cli(dataset, tmp_path):
    args = ["-m", "+sweep=dict_sizes", "model=clt", "model.n_features=8,16", f"data.path={dataset}",
            "logger.group=tiny", *TINY]
    res = _cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "tiny"
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    # readable names; the constant data.path (with its slashes) is in no name and makes no nested folders
    assert runs == ["clt-F16-ls1", "clt-F8-ls1"], runs
    for name, F in (("clt-F8-ls1", 8), ("clt-F16-ls1", 16)):
        assert ModelReader(sweep_dir / name / "model").cfg.n_features == F
        assert (sweep_dir / name / "metrics.jsonl").is_file()
    before = weights(sweep_dir / "clt-F8-ls1" / "model")

    # Resubmitted unchanged: both runs are finished, so both are skipped (the models stay as they were).
    again = _cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipped") == 2, again.stdout[-2000:]
    after = weights(sweep_dir / "clt-F8-ls1" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)

    # A failed run (checkpoints but no model) is a marked row; the others are evaluated.
    (sweep_dir / "clt-F32-ls1" / "checkpoints").mkdir(parents=True)
    ev = _cli([f"sweep_dir={sweep_dir}", "replacement.enabled=false", "logger.mode=disabled", "progress=false",
               "max_tokens=256", "batch_tokens=128"], tmp_path, module="cltrain.train.evaluate")
    assert ev.returncode == 0, ev.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep_dir / "report" / "sweep.csv")))
    by = {r["run"]: r for r in rows}
    assert set(by) == {"clt-F8-ls1", "clt-F16-ls1", "clt-F32-ls1"}
    assert by["clt-F32-ls1"]["status"].startswith("failed")
    for name, F in (("clt-F8-ls1", "8"), ("clt-F16-ls1", "16")):
        r = by[name]
        assert r["status"] == "ok" and r["arch"] == "CLT" and r["n_features"] == F and r["lambda_s"] == "1.0"
        assert 0 < float(r["nmse_mean"]) and abs(float(r["explained_variance"]) - (1 - float(r["nmse_mean"]))) < 1e-6
    assert (sweep_dir / "report" / "frontier.png").stat().st_size > 0
    assert "| clt-F8-ls1 | ok | CLT | 8 |" in (sweep_dir / "report" / "sweep.md").read_text()


def test_invalid_sweep_value_stops_before_any_run(dataset, tmp_path):
    res = _cli(["-m", "+sweep=dict_sizes", "model=clt", "model.n_features=8,-1", f"data.path={dataset}",
                "logger.group=bad", *TINY], tmp_path)
    assert res.returncode == 2
    assert "model.n_features" in res.stderr and "-1" in res.stderr and "no run was started" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_run_names():
    assert names.base_name(False, 4096, 5.0) == "clt-F4096-ls5"
    assert names.base_name(True, 1024, 0.5) == "plt-F1024-ls0.5"
    assert names.base_name("false", 64, 1, "batchtopk", 16) == "clt-F64-batchtopk16"
    assert names.clean("/data/acts v2") == "data_acts_v2"


def test_slurm_launcher_sbatch_parameters(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # no SLURM here: submitit looks for srun before writing an sbatch file
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose("train", ["+sweep=dict_sizes", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                            "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8
    # The parameters as hydra-submitit-launcher hands them to submitit (its launch()), into an sbatch file.
    params = {k: v for k, v in OmegaConf.to_container(cfg.hydra.launcher, resolve=True).items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm")
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --signal=USR2@120"):
        assert line in text, text
    # the trainer checkpoints on submitit's time-limit signal (USR2), as on SLURM's SIGTERM
    import signal
    assert signal.SIGUSR2 in lifecycle.StopSignals.SIGNALS
    assert "srun" in text  # one task per GPU, each a rank


def test_slurm_rendezvous():
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242", "RANK": "0"}
    rank_env.slurm_rendezvous(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("11", "16", "3")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 4242)
    plain = {"SLURM_PROCID": "1"}
    rank_env.slurm_rendezvous(plain)  # not a submitit job: untouched
    assert plain == {"SLURM_PROCID": "1"}


def _cfg(dataset, out, *extra):
    return compose("train", [f"data.path={dataset}", f"out_dir={out}", "model.n_features=8", "steps=6",
                             "model.threshold_calibration_rate=0.2", *TINY[1:], *extra])


DICTS = "dictionaries=[{model.n_features: 8}, {model.n_features: 16, model.per_layer: true}, {model.loss.lambda_s: 3.0}]"


def test_dictionaries_equal_separate_runs_and_resume(dataset, tmp_path):
    trainer.train(_cfg(dataset, tmp_path / "multi", DICTS))
    names = {"clt-F8-ls1": [], "plt-F16-ls1": ["model.n_features=16", "model.per_layer=true"],
             "clt-F8-ls3": ["model.loss.lambda_s=3.0"]}
    for name, extra in names.items():
        alone = trainer.train(_cfg(dataset, tmp_path / "alone" / name, *extra))
        a, b = weights(alone), weights(tmp_path / "multi" / name / "model")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # interrupted at step 2 and resumed: the same models
    trainer.train(_cfg(dataset, tmp_path / "cut", DICTS, "stop_at_step=2"))
    assert (tmp_path / "cut" / "clt-F8-ls1" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    trainer.train(_cfg(dataset, tmp_path / "cut", DICTS, "resume=true"))
    for name in names:
        a, b = weights(tmp_path / "multi" / name / "model"), weights(tmp_path / "cut" / name / "model")
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_dictionaries_bad_entry_is_named(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"dictionaries\[1\].*model.n_features"):
        trainer.train(_cfg(dataset, tmp_path / "x", "dictionaries=[{model.n_features: 8}, {model.n_features: -1}]"))
    assert not (tmp_path / "x").exists()


def test_sweep_through_submitit_executor(dataset, tmp_path):
    # submitit's local executor stands in for SLURM: the same launcher plugin pickles the job, runs it in
    # its own process, and the run lands under its readable name
    res = _cli(["-m", "+sweep=dict_sizes", "model=plt", "model.n_features=8", f"data.path={dataset}",
                "logger.group=sub", "hydra/launcher=submitit_local", *TINY], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ModelReader(tmp_path / "runs" / "sub" / "plt-F8-ls1" / "model").cfg.per_layer
    assert list((tmp_path / "runs" / "sub" / ".submitit").iterdir())  # submitit's job folders
