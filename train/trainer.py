"""clt-train: train K >= 1 dictionaries (CLTs / PLTs) on activation shards with DeepSpeed, on one batch
stream (docs/design.md sections 1, 3, 6).

    clt-train data.path=DIR model.n_features=4096 steps=20000          # 1 process
    torchrun --nproc_per_node 4 -m cltrain.train.trainer parallel=fp2 ... # DP=2 x FP=2 (see launch/)
    clt-train data.path=DIR out_dir=runs/sizes \
        'dictionaries=[{model.n_features: 1024}, {model.n_features: 4096, model.per_layer: true}]'

`train(cfg)` is the whole job as a function (the demo and the tests call it); `main()` is the Hydra
entry point. The split follows torchtitan's: the model (train/clt.py) is rank-free; the layout
(train/parallel.py) shards it from outside; one dictionary's engine, state and checkpoints are
train/dictionary.py; this file owns the loop: batches, schedule of checkpoints and evaluations,
preemption, publishing.

With `dictionaries`, each dictionary is an ordinary run in out_dir/<its run name>, with its own
checkpoints, metrics.jsonl, W&B run (in the group logger.group, default the base run name) and OUT/model;
each equals the separate run `clt-train` would give with the same overrides, and each resumes
(resume=true) or is evaluated as one. Only model.* and optim.* keys may differ, so every dictionary sees
the same data order; the batches are read, decoded and normalized once. On a resubmission (resume=true)
finished dictionaries are skipped and the rest resume together.

All ranks of a feature-parallel group read the same batches (the loader is keyed by the DP rank).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from cltrain.errors import ConfigError
from cltrain.rank_env import dist_env, slurm_rendezvous

from . import checkpoint as ckpt
from .config import CONFIG_DIR, TrainSettings, resolve_precision
from .data import DatasetError, DatasetInfo, loader_from_config, verify_shards
from .dictionary import Dictionary, OutOfMemory, Shared
from .engine import import_deepspeed
from .live import LiveLoader, scales_of_checkpoint
from .lifecycle import PeerLeft, Preempted, RankLost, StopSignals, Teardown, run_command
from .memory import PhasePeaks
from .parallel import Layout, dist_timeout, init_distributed, resolve_device
from .sweep import finished_model, mark_swept


class Trainer:
    """K >= 1 dictionaries trained on this rank on one batch stream: `build(settings)` sets everything up
    (or resumes), `train_step(batches)` is one optimizer step of every dictionary, `save()` checkpoints
    them, `fit()` runs to the end and publishes each OUT/model."""

    @classmethod
    def build(cls, cfg, dictionaries: list[TrainSettings] | None = None) -> "Trainer":
        """cfg: the run's settings (or its composed config); dictionaries: the settings of the ones to train
        (default: all of the run's). A build that fails closes what it had started."""
        self = cls()
        self.dictionaries, self.loader = [], None
        try:
            self._build(TrainSettings.from_config(cfg), dictionaries)
        except BaseException:
            self.close()
            raise
        return self

    def _build(self, s: TrainSettings, todo: list[TrainSettings] | None):
        self.s = s
        todo = todo if todo is not None else s.dictionary_settings()
        live = s.data.source == "live"
        if s.data.path is None and not live:
            raise ConfigError("config key 'data.path' = None: expected the dataset folder or URL written by clt-harvest "
                              "(or data=live: activations from the base model as the run goes)")
        info = None if live else DatasetInfo.load(str(s.data.path))  # DatasetError names dataset.json when missing/bad
        _, world, local_rank = dist_env()
        s.check_runtime(world, torch.cuda.is_available())
        device = resolve_device(s.device, local_rank)
        precision = resolve_precision(s.precision, device.type)
        rank, world = init_distributed(s.parallel.backend, device)
        try:
            layout = Layout.build(s.parallel.feature_parallel)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if live:  # the base model's shape and the scales first: the dictionaries are sized by them
            self.loader = LiveLoader.open(s.data.live, s.batch_tokens, s.data.shuffle_buffer, s.seed, layout=layout,
                                          num_workers=s.data.num_workers, timeout=s.data.timeout, device=device,
                                          scales=_resumed_live_scales(todo))
            info = self.loader.info
        steps = s.resolve_steps(layout.dp_size)
        # stop_at_step: end this invocation early (checkpointed) while the schedules still span `steps` --
        # for jobs with a wall-clock limit, resubmitted with resume=true.
        stop = steps if s.stop_at_step is None else min(steps, s.stop_at_step)
        self.shared = sh = Shared(info, device, precision, layout, rank, world, steps, stop, import_deepspeed(device),
                                  loader=self.loader, generator_bytes=self.loader.generator_bytes if live else 0)
        self.device, self.layout, self.rank, self.world, self.stop = device, layout, rank, world, stop

        for ds in todo:
            d = Dictionary(ds, sh)
            self.dictionaries.append(d)
            d.claim()
        for d in self.dictionaries:
            d.allocate(_install_kernels)
        if device.type == "cpu":  # each step's large temporaries then reuse mapped memory
            from cltrain.kernels import retain_freed_cpu_memory
            retain_freed_cpu_memory()
        # Batches stay in the shards' dtype (pinned on CUDA); they are normalized on the device, once.
        if not live:
            self.loader = sh.loader = loader_from_config(
                s.data, s.batch_tokens, dp_rank=layout.dp_rank, dp_size=layout.dp_size, seed=s.seed, device=device,
                normalize=False, verified=self._verify_shards(),
                # one shuffle window per feature-parallel group, 1/P on each rank (data/loader.py)
                fp_group=layout.fp_group if layout.fp_size > 1 else None, fp_rank=layout.fp_rank,
                fp_size=layout.fp_size)
        for i, d in enumerate(self.dictionaries):
            d.start(progress=s.progress and i == 0)  # one progress bar per job
        at = {str(d.out_dir): d.step for d in self.dictionaries}
        if len(set(at.values())) > 1:
            raise ConfigError(f"dictionaries: their checkpoints are at different steps ({at}); they train on one "
                              f"data pass only from the same step: resume them separately, or start them anew")
        self.step = self.dictionaries[0].step
        self.batches = iter(self.loader)
        self.pending = None  # a batch read ahead of the loop (calibration's): step 0 trains on it
        if self.step == 0 and any(d.s.model.threshold_calibration_rate is not None for d in self.dictionaries):
            self.pending = next(self.batches)
            x = self.loader.to_training(self.pending, dtype=torch.float32)[0]
            for d in self.dictionaries:
                d.calibrate(x)
        sh.peaks = self.peaks = PhasePeaks()
        self.peaks.end("startup")
        self.preemption = StopSignals()

    def _verify_shards(self) -> dict | None:
        """Every local shard's sha256 before the first step (data.verify_upfront): rank 0 hashes them
        (shared storage), every rank stops with its message if one is bad. Returns the identities of the
        files hashed (rank 0's, sent to every rank), which spare the loader a second hash of each."""
        s, info = self.s, self.shared.info
        if not s.data.verify_upfront:
            return None
        error, identities = None, None
        if self.rank == 0:
            try:
                identities = verify_shards(str(s.data.path), split="all", heldout_shards=s.data.heldout_shards,
                                           progress=s.progress)["identities"]
            except DatasetError as e:
                error = e
        if not ckpt.all_ranks_ok(error is None, self.device):
            raise error or DatasetError(f"{info.json_path}: a shard failed its sha256 check (see rank 0)")
        if dist.is_initialized() and dist.get_world_size() > 1:
            # another node sees another device number for shared storage: its loader then hashes again
            box = [identities]
            dist.broadcast_object_list(box, src=0)
            identities = box[0]
        return identities

    @property
    def memory(self):
        return self.dictionaries[0].memory

    # --- one step ---

    def next_batch(self):
        if self.pending is not None:
            batch, self.pending = self.pending, None
            return batch
        try:
            return next(self.batches)
        except StopIteration:
            raise DatasetError(f"{self.shared.info.json_path}: the loader ended at step {self.step}") from None

    def train_step(self, batches: list) -> list[dict | None]:
        """One optimizer step of every dictionary over len(batches) micro-batches (grad_accum of them:
        loader batches, or normalized (x, y) pairs), each normalized once for all dictionaries; returns
        each dictionary's reported values on report steps (log_every), else None. Collective."""
        for d in self.dictionaries:
            d.begin_step()
        for batch in batches:
            x, y = self.loader.to_training(batch, dtype=torch.float32) if hasattr(batch, "token_ids") else batch
            for d in self.dictionaries:
                d.micro_step(x, y)
            del x, y
        self.step += 1
        return [d.end_step() for d in self.dictionaries]

    def save(self) -> list[Path]:
        """Checkpoint every dictionary at the current step (collective)."""
        return [d.save() for d in self.dictionaries]

    # --- the loop ---

    def fit(self) -> list[Path]:
        """Train to the stop step, checkpointing every checkpoint_every steps and at the end, then
        publish each OUT/model (that run's final model; never another run's). Returns them. A stop
        signal (SIGTERM, SIGUSR1/2, Ctrl-C; lifecycle.StopSignals) makes every rank finish its step and
        checkpoint together, then raises Preempted (exit code lifecycle.EXIT_PREEMPTED)."""
        s, dicts = self.s, self.dictionaries
        last = [None] * len(dicts)
        timer = dicts[0].timer  # the data phase is timed once, in the first dictionary's report
        with self.preemption:
            while self.step < self.stop:
                batches = []
                for _ in range(s.grad_accum):
                    with timer.phase("data"):
                        batches.append(self.next_batch())
                reports = self.train_step(batches)
                extra = {"data/epoch": getattr(self.loader, "epoch", 0)}
                if len(dicts) > 1:
                    extra["dictionaries"] = len(dicts)
                for d, values in zip(dicts, reports):
                    if s.eval_every and self.step % s.eval_every == 0:
                        values = dict(values or {}, **d.evaluate())
                    d.log(values, extra)
                preempted = self.preemption.requested(self.device, self.step)  # every rank agrees
                if self.step % s.checkpoint_every == 0 or self.step == self.stop or preempted:
                    self.peaks.end("steps")
                    for d in dicts:
                        d.timer.current = "checkpoint"
                    last = self.save()
                    for d in dicts:
                        d.timer.current = None
                    self.peaks.end("checkpoint")
                if preempted and self.step < self.stop:
                    for d in dicts:
                        d.write_memory_report()
                    where = last[0] if len(dicts) == 1 else f"{len(dicts)} dictionaries in {s.out_dir}"
                    dicts[0].logger.print(f"clt-train: {self.preemption.name} received: checkpointed at step "
                                          f"{self.step} ({where}); resubmit with resume=true to continue")
                    raise Preempted(last[0])
        if isinstance(self.loader, LiveLoader):
            self.loader.finish()  # write_to: dataset.json over every window written
        models = [d.finish(ck) for d, ck in zip(dicts, last)]
        if self.world > 1:
            dist.barrier()
        if len(dicts) == 1:
            dicts[0].logger.print(f"clt-train: done at step {self.step}; model in {models[0]}, "
                                  f"checkpoint {dicts[0].last_ckpt}")
        else:
            dicts[0].logger.print(f"clt-train: {len(models)} dictionaries done at step {self.step}: "
                                  + ", ".join(str(m) for m in models))
        return models

    def where(self) -> str:
        """What this rank was doing: the step phase (the FP all-reduce runs in decode, DeepSpeed's
        gradient reduction in backward) or the checkpoint."""
        timer = self.dictionaries[0].timer if self.dictionaries and hasattr(self.dictionaries[0], "timer") else None
        return f"step {getattr(self, 'step', 0) + 1}, {(timer.current if timer else None) or 'between phases'}"

    def close(self):
        """End what this rank started, none of it collective: each dictionary (W&B run, progress bar,
        DeepSpeed engine, folder lock), then the loader's worker processes (joined). Idempotent."""
        for d in reversed(self.dictionaries):
            d.close()
        loader, self.loader = self.loader, None
        if loader is not None:
            loader.close()


def _install_kernels(clt, impl: str) -> str:
    if impl == "dense":
        return "dense"  # the reference encode/decode the CLT starts with
    try:
        from cltrain.kernels import install
    except ImportError as e:
        raise ConfigError(f"config key 'kernels' = {impl!r}: cltrain.kernels.install is unavailable ({e}); "
                          "use kernels=dense") from None
    return install(clt, impl)


def _named_failure(e: BaseException, trainer) -> Exception | None:
    """A failed collective or allocation as the error a user can act on (None: a bug, keep the traceback)."""
    text, rank = str(e), dist.get_rank() if dist.is_initialized() else 0
    low = text.lower()
    where = trainer.where() if trainer is not None else "start-up"
    if not isinstance(e, MemoryError) and ("timed out" in low or "timeout" in low) and "connect" not in low:
        return RankLost(
            f"rank {rank}: a collective ({where}) waited longer than CLTRAIN_DIST_TIMEOUT="
            f"{int(dist_timeout().total_seconds())} s for another rank, which is hung or dead; the job "
            f"stops (resume=true continues from the last checkpoint). {text.splitlines()[0][:200]}")
    if any(s in low for s in ("connection closed by peer", "connection reset by peer", "broken pipe")):
        return PeerLeft(f"rank {rank}: another rank left the job during a collective ({where}); look for its "
                        f"own error above. resume=true continues from the last checkpoint")
    if isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in low:
        estimate = f"; estimated need {trainer.memory.describe()}" if trainer is not None else ""
        return OutOfMemory(f"rank {rank} ran out of memory ({text.splitlines()[-1][:200] if text else 'MemoryError'})"
                           f"{estimate}. Use more feature-parallel ranks, a smaller batch_tokens or "
                           f"data.shuffle_buffer")
    return None


def _resumed_live_scales(todo: list[TrainSettings]):
    """A resumed live run's normalization scales (from the checkpoint it resumes), so that the run keeps
    normalizing as it began; None for a fresh run."""
    s = todo[0]
    resume_from = ckpt.resolve_resume(s.resume, Path(str(s.out_dir)) / "checkpoints")
    return scales_of_checkpoint(resume_from) if resume_from is not None else None


def train(cfg) -> Path:
    """Run (or resume) a training job from its settings (or composed config); returns OUT/model, the whole
    trained CLT (model_io.load_clt), or with `dictionaries` out_dir (each dictionary's model in
    out_dir/<name>/model). Everything it starts (loader workers, W&B, the DeepSpeed engines, a process group
    it created) has ended when it returns or raises (lifecycle.Teardown)."""
    s = TrainSettings.from_config(cfg)
    todo = []
    for ds in s.dictionary_settings():
        done = finished_model(ds)  # a resubmitted sweep: this run already finished
        if done is not None:
            print(f"clt-train: {done} is this run's finished model (resume=true): skipped", flush=True)
        else:
            todo.append(ds)
    result = Path(str(s.out_dir)) if s.dictionaries else Path(str(s.out_dir)) / "model"
    if not todo:
        return result
    trainer = None
    with Teardown() as teardown:
        try:
            trainer = Trainer.build(s, todo)
            teardown.add(trainer.close)
            trainer.fit()
            return result
        except (RuntimeError, MemoryError) as e:
            named = _named_failure(e, trainer)
            if named is None:
                raise
            raise named from None


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local-rank N` (appended by the deepspeed launcher and old
    torch.distributed.launch) before Hydra parses argv; the value goes to LOCAL_RANK if unset."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
        i += 1
    return out


# ----------------------------------------------------------------------------------------------------
# Console entry point


def _hydra_job(cfg: DictConfig):
    slurm_rendezvous()  # a SLURM job sent by the submitit launcher: ranks and rendezvous from SLURM_*
    run_command(lambda: train(cfg), "clt-train", bad_input=(ConfigError, DatasetError, ckpt.CheckpointError))


def main():
    sys.argv = strip_launcher_args(sys.argv)
    mark_swept(sys.argv)  # a multirun: every run is checked before the first starts
    dist_env()  # map SLURM_* to RANK/WORLD_SIZE/LOCAL_RANK now: the Hydra run dir is per ${RANK}
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")(_hydra_job)()


if __name__ == "__main__":
    main()
