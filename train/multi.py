"""Several dictionaries per data pass: K CLTs / PLTs (different sizes, lambda_s, learning rates) trained in
one job on the same batches, which are read, decoded and normalized once.

    clt-train data.path=DIR out_dir=runs/sizes \
        'dictionaries=[{model.n_features: 1024}, {model.n_features: 4096}, {model.n_features: 1024, model.per_layer: true}]'

Each dictionary is an ordinary run (a Trainer) in out_dir/<its run name>, with its own checkpoints,
metrics.jsonl, W&B run (in the group logger.group, default the base run name) and OUT/model: each
equals the separate run `clt-train` would give with the same overrides, and each resumes (resume=true)
or is evaluated as one. Only model.* and optim.* keys may differ, so every dictionary sees the same data
order. On a resubmission (resume=true) finished dictionaries are skipped and the rest resume together.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .config import validate_train
from cltrain.errors import ConfigError
from .lifecycle import Preempted, Teardown
from .sweep import finished_model
from cltrain.names import base_name, clean


def dictionary_configs(cfg: DictConfig) -> list[DictConfig]:
    """One full run config per entry of `dictionaries`: the base config with its overrides, out_dir
    out_dir/<name>, logger.run_name <name>, logger.group the sweep's."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base["dictionaries"] = None
    group = cfg.logger.get("group") or str(cfg.logger.run_name)
    out, names = [], {}
    for i, overrides in enumerate(cfg.dictionaries):
        c = OmegaConf.create(base)
        overrides = OmegaConf.to_container(overrides, resolve=True)
        for key, value in overrides.items():
            OmegaConf.update(c, key, value, merge=False, force_add=True)
        try:
            validate_train(c)
        except ConfigError as e:
            raise ConfigError(f"dictionaries[{i}] {overrides}: {e}") from None
        m = c.model
        name = base_name(m.per_layer, m.n_features, m.loss.lambda_s, m.activation, m.topk)
        extra = [f"{k.split('.')[-1]}{clean(v)}" for k, v in overrides.items()
                 if k not in ("model.per_layer", "model.n_features", "model.loss.lambda_s", "model.activation",
                              "model.topk")]
        name = "-".join([name] + sorted(extra))
        if name in names:
            raise ConfigError(f"config key 'dictionaries': entries {names[name]} and {i} are the same run ({name})")
        names[name] = i
        c.out_dir = str(Path(str(cfg.out_dir)) / name)
        c.logger.run_name = name
        c.logger.group = group
        out.append(c)
    return out


class MultiTrainer:
    """K Trainers sharing one loader, stepped in lockstep on the same (normalized once) batches."""

    def __init__(self, cfgs: list[DictConfig]):
        from .trainer import Trainer

        self.first = None
        self.trainers = []
        try:
            lead = Trainer.build(cfgs[0], first_batch=self._first)
            self.trainers.append(lead)
            for c in cfgs[1:]:
                self.trainers.append(Trainer.build(c, loader=lead.loader, first_batch=self._first))
        except BaseException:
            self.close()
            raise
        at = {str(t.out_dir): t.step for t in self.trainers}
        if len(set(at.values())) > 1:
            self.close()
            raise ConfigError(f"dictionaries: their checkpoints are at different steps ({at}); they train on one "
                              f"data pass only from the same step: resume them separately, or start them anew")
        self.lead, self.loader = lead, lead.loader

    def _first(self, loader):
        if self.first is None:  # calibration's batch; step 0 trains on it (as a separate run does)
            self.first = next(iter(loader))
        return self.first

    @property
    def step(self) -> int:
        return self.lead.step

    def fit(self) -> list[Path]:
        lead = self.lead
        every, accum = int(lead.cfg.checkpoint_every), int(lead.cfg.grad_accum)
        eval_every = int(lead.cfg.get("eval_every", 0) or 0)
        stop = lead.stop
        pending = self.first if lead.step == 0 else None
        batches_it = iter(self.loader)
        last = {id(t): None for t in self.trainers}
        with lead.preemption:
            while lead.step < stop:
                raw = []
                for _ in range(accum):
                    with lead.timer.phase("data"):
                        if pending is not None:
                            raw.append(pending)
                            pending = None
                        else:
                            raw.append(next(batches_it))
                # normalized once, used by every dictionary
                batches = [lead.batch_tensors(b) for b in raw]
                for t in self.trainers:
                    values = t.train_step(batches)
                    if eval_every and t.step % eval_every == 0:
                        values = dict(values or {}, **t.evaluate())
                    if values is not None:
                        values["data/epoch"] = getattr(self.loader, "epoch", 0)
                        values["dictionaries"] = len(self.trainers)
                        t.logger.log(t.step, values, t.full_cfg.n_layers)
                        t.logger.advance(1, **{k: values[v] for k, v in (("nmse", "nmse/mean"), ("l0", "l0/mean"))
                                               if v in values})
                    else:
                        t.logger.advance(1)
                preempted = lead.preemption.requested(lead.device, lead.step)
                if lead.step % every == 0 or lead.step == stop or preempted:
                    for t in self.trainers:
                        last[id(t)] = t.save()
                if preempted and lead.step < stop:
                    lead.logger.print(f"clt-train: {lead.preemption.name} received: {len(self.trainers)} "
                                      f"dictionaries checkpointed at step {lead.step}; resubmit with resume=true")
                    raise Preempted(last[id(lead)])
        models = []
        for t in self.trainers:
            ck = last[id(t)]
            if ck is None:  # resumed at the end: its latest checkpoint
                ck = ckpt.latest_checkpoint(t.checkpoints.root)
                if ck is None or ck.name != ckpt.step_name(t.step):
                    ck = t.save()
            t.write_memory_report()
            final = t.out_dir / "model"
            if t.rank == 0:
                ckpt.publish_model(ck, final, t.fingerprint)
            models.append(final)
        if lead.world > 1:
            dist.barrier()
        lead.logger.print(f"clt-train: {len(models)} dictionaries done at step {lead.step}: "
                          + ", ".join(str(m) for m in models))
        return models

    def close(self):
        # the lead owns the shared loader: closed last
        for t in reversed(self.trainers):
            t.close()


def train_dictionaries(cfg: DictConfig, teardown: Teardown) -> Path:
    """clt-train with `dictionaries`: returns out_dir (each dictionary's model in out_dir/<name>/model).
    The trainers are closed by `teardown` (train/trainer.py `train`)."""
    validate_train(cfg)
    cfgs = dictionary_configs(cfg)
    todo = []
    for c in cfgs:
        done = finished_model(c)
        if done is not None:
            print(f"clt-train: {done} is this run's finished model (resume=true): skipped", flush=True)
        else:
            todo.append(c)
    if todo:
        multi = MultiTrainer(todo)
        teardown.add(multi.close)
        multi.fit()
    return Path(str(cfg.out_dir))
