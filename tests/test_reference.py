"""`make reference` (train/reference.py) at a tiny scale: the real recipe (configs/reference.yaml) with its
sizes shrunk (tiny-llama, F = 8, 256 tokens), through every stage.

- the plan is printed with an ETA and the disk needed;
- training stopped at its first checkpoint (--stop-at-step) and resumed by a second invocation ends with
  the same weights as an uninterrupted run, bit for bit;
- a rerun skips every stage whose result exists;
- the held-out text shares no document with the training text, and each stage reads the text it should;
- the report has its tables and curves.
"""
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cltrain.train import reference


def _sub(overrides, changes):
    out = []
    for o in overrides:
        k = o.partition("=")[0]
        out.append(f"{k}={changes.pop(k)}" if k in changes else o)
    assert not changes, f"recipe keys not found: {changes}"  # the real recipe changed: update the test
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    r = yaml.safe_load(reference.RECIPE.read_text())
    r["base_model"] = "tiny-llama"
    r["text"]["sources"] = ["builtin"]
    r["text"]["heldout_tokens"] = 2048
    r["train"] = _sub(r["train"], {"data.live.context": 16, "model.n_features": 8, "train_tokens": 256,
                                   "batch_tokens": 32, "checkpoint_every": 3, "log_every": 2,
                                   "dead_after_tokens": 64}) + ["data.live.batch_size=4", "data.shuffle_buffer=64",
                                                                "kernels=dense"]
    r["plt_frontier_lambda_s"] = [2.5]
    r["heldout"] = {"tokens": 256, "window": 64}
    r["eval"]["common"] = _sub(r["eval"]["common"], {"max_tokens": 256, "replacement.n_sequences": 2,
                                                     "replacement.seq_len": 16})
    r["eval"]["clt"] = ["graphs.enabled=false", "features.enabled=true", "features.n_contexts=8",
                        "features.context=16", "circuits.enabled=false"]
    r["eval"]["plt"] = ["graphs.enabled=false"]
    r["eval"]["heldout_prompts"] = 2
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def run(recipe, out: Path, *args) -> int:
    return reference.main(["--recipe", str(recipe), "--out", str(out), "--report", str(out / "report.md"),
                           "--no-wandb", *args])


def weights(run_dir: Path) -> dict:
    files = sorted((run_dir / "model").glob("*.safetensors"))
    assert files, f"no weights in {run_dir / 'model'}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").iterdir() if (p / "checkpoints").is_dir())


def test_reference_end_to_end(recipe, tmp_path, capsys):
    # uninterrupted training
    straight = tmp_path / "straight"
    assert run(recipe, straight, "--until", "train") == 0
    printed = capsys.readouterr().out
    assert "=== plan" in printed and "ETA" in printed and "disk:" in printed and "GB" in printed
    assert "base model forward" in printed and "CLT step" in printed and "PLT step" in printed
    rates = json.loads((straight / "rates.json").read_text())
    assert rates["generate_tok_s"] > 0 and rates["clt_step_s"] > 0 and rates["plt_step_s"] > 0
    assert not (straight / "heldout").exists()  # --until train stopped there

    # interrupted at the first checkpoint, then resumed by a second invocation
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(straight / "rates.json", cut / "rates.json")  # measured once
    assert run(recipe, cut, "--stop-at-step", "3") == 0
    printed = capsys.readouterr().out
    assert "training stopped at step 3 of 8" in printed
    assert not (cut / "heldout").exists()  # later stages wait for the whole training
    assert all((cut / "runs" / n / "checkpoints" / "latest").read_text().strip() == "step-000003" for n in names(cut))
    # a sitting whose time is up does not start training
    assert run(recipe, cut, "--hours", "0") == 0
    assert "time is up" in capsys.readouterr().out
    assert run(recipe, cut, "--until", "train") == 0
    capsys.readouterr()
    assert names(cut) == names(straight) and len(names(cut)) == 3  # CLT, PLT twin, one frontier PLT
    for n in names(cut):
        a, b = weights(straight / "runs" / n), weights(cut / "runs" / n)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), f"{n} {k}: resumed run differs"

    # held-out text: whole documents the training text never holds; each stage reads its own
    train_docs = [json.loads(x) for x in (cut / "text" / "train.jsonl").read_text().splitlines()]
    held_docs = [json.loads(x) for x in (cut / "text" / "heldout.jsonl").read_text().splitlines()]
    assert train_docs and held_docs
    assert not {d["doc"] for d in train_docs} & {d["doc"] for d in held_docs}
    assert not {d["text"] for d in train_docs} & {d["text"] for d in held_docs}
    assert all(d["doc"] % 10 == 9 for d in held_docs)
    manifest = json.loads((cut / "text" / "manifest.json").read_text())
    assert manifest["enough"] and manifest["train"]["tokens"] >= 1.1 * 256

    # the rest: held-out activations, eval, export, report
    assert run(recipe, cut) == 0
    capsys.readouterr()
    clt_run = cut / "runs" / names(cut)[0]
    model_meta = json.loads((clt_run / "model" / "model.json").read_text())
    trained_on = json.loads(model_meta["train"]["config"]) if model_meta["train"]["config"].startswith("{") else \
        yaml.safe_load(model_meta["train"]["config"])
    assert trained_on["data"]["live"]["text"]["source"] == str(cut / "text" / "train.jsonl")
    held = json.loads((cut / "heldout" / "dataset.json").read_text())
    assert held["harvest"]["live"]["text"]["source"] == str(cut / "text" / "heldout.jsonl")
    assert held["scale_x"] == model_meta["dataset"]["scale_x"]  # normalized as the run was
    clt_eval = json.loads((cut / "runs" / "clt-F8-ls5" / "model" / "eval" / "metrics.json").read_text())
    assert clt_eval["replacement"]["text"]["source"] == str(cut / "text" / "heldout.jsonl")
    assert (cut / "export_clt" / "config.yaml").is_file()
    assert (cut / "export_clt" / "features").is_dir()  # the CLT's feature pages ship with its export

    report = (cut / "report.md").read_text()
    for section in ("## Machine and run", "## Held-out results", "## CLT against PLT at equal L0", "## Aims",
                    "## The paper's anchors", "## Learning curves"):
        assert section in report, section
    assert "| CLT | " in report and "| PLT | " in report and "plt-F8-ls2.5" in report
    assert "0.61" in report and "11.5%" in report  # the paper's anchors beside ours
    for png in ("curve_nmse.png", "curve_l0.png", "curve_dead.png"):
        assert (cut / "report" / png).stat().st_size > 1000
        assert f"report/{png}" in report
    assert (cut / "report" / "sweep.md").is_file()
    # dead features by when they last fired, read from each run's last checkpoint: the same features the
    # trainer's last logged dead fraction counted
    assert "### Dead features by when they died" in report and "report/dead_last_fired.png" in report
    assert (cut / "report" / "dead_last_fired.png").stat().st_size > 1000
    from cltrain.train.checkpoint import feature_last_fired, latest_checkpoint

    for n in names(cut):
        last, tokens = feature_last_fired(latest_checkpoint(cut / "runs" / n / "checkpoints"))
        assert tokens == 256 and last.shape[1] == 8 and 0 <= last.min() and last.max() <= tokens
        logged = [json.loads(x) for x in (cut / "runs" / n / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in logged if r.get("step") == 8 and "features/dead_fraction" in r][-1]
        assert (last <= tokens - 64).double().mean().item() == pytest.approx(final["features/dead_fraction"])
    assert (cut / "report" / "metrics_clt-F8-ls5.json").is_file()

    # a rerun skips every stage whose result exists
    stamp = {p: p.stat().st_mtime_ns for p in (cut / "runs").rglob("metrics.json")}
    assert run(recipe, cut) == 0
    printed = capsys.readouterr().out
    for what in ("corpus already built", "training already done", "held-out activations already written",
                 "clt already evaluated", "plt already evaluated", "CLT already exported"):
        assert what in printed, what
    assert stamp == {p: p.stat().st_mtime_ns for p in (cut / "runs").rglob("metrics.json")}


def test_dead_features_are_read_by_when_they_last_fired_from_the_last_checkpoint(tmp_path):
    """The report's 'dead features by when they died': a checkpoint's tokens_since_fire, over feature shards
    of two ranks, gives the tokens at which each feature last fired; dead = not fired in dead_after_tokens."""
    import torch
    from safetensors.torch import save_file

    from cltrain.train.checkpoint import FORMAT, CheckpointError

    tokens = 1000
    since = torch.tensor([[0.0, 999.0, 300.0, 1000.0], [50.0, 700.0, 20.0, 400.0]], dtype=torch.float64)
    step = tmp_path / "run" / "checkpoints" / "step-000010"
    (step / "optim").mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"format": FORMAT, "tokens": tokens, "step": 10}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000010")
    shards = []
    for r, (a, b) in enumerate(((0, 2), (2, 4))):
        save_file({"stats/tokens_since_fire": since[:, a:b].contiguous()}, str(step / "optim" / f"o{r}.safetensors"))
        shards.append({"file": f"o{r}.safetensors", "features": [a, b]})
    (step / "optim" / "index.json").write_text(json.dumps({"n_features": 4, "shards": shards}))
    (tmp_path / "none" / "checkpoints").mkdir(parents=True)  # a run without a checkpoint is left out

    dead = reference.dead_when([tmp_path / "run", tmp_path / "none"], dead_after_tokens=400)
    assert list(dead) == ["run"]
    v = dead["run"]
    assert v["tokens"] == tokens and v["features"] == 8
    # dead: since >= 400, i.e. last fired at 1, 0 (never), 300 and 600 tokens
    assert sorted(v["last_fired"]) == [0.0, 1.0, 300.0, 600.0]
    assert v["per_layer"] == [0.5, 0.5]
    assert reference.plot_dead_when(dead, tmp_path).stat().st_size > 1000

    (step / "optim" / "o1.safetensors").unlink()  # a broken checkpoint is named
    with pytest.raises(CheckpointError, match="o1.safetensors"):
        from cltrain.train.checkpoint import feature_last_fired
        feature_last_fired(step)


class _WordTokenizer:
    def encode(self, text, **_):
        return text.split()


def test_training_documents_are_shuffled_across_sources_and_held_out_documents_stay_out(recipe, tmp_path,
                                                                                        monkeypatch):
    # three sources of 40 documents each, read one after the other: in source order a live run (which reads
    # its text once, front to back) met one domain, then the next; the reference CLT's features of the
    # earlier domains went dead. The training text must mix them from its first documents on.
    def fake_source(source):
        # one long document in the second source: it is cut into parts, scattered like the rest
        return "1", (f"{source} document {k} " + ("word " * 20 if (source, k) != ("beta", 3) else
                                                  "\n\n".join(f"paragraph {j} " + "long " * 30 for j in range(12)))
                     for k in range(40))

    monkeypatch.setattr(reference, "source_documents", fake_source)
    raw = yaml.safe_load(recipe.read_text())
    raw["text"].update(sources=["alpha", "beta", "gamma"], heldout_every=10, train_margin=1.0, heldout_tokens=250,
                       part_chars=400)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))

    def build(out, seed):
        raw["text"]["shuffle_seed"] = seed
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        manifest = reference.build_corpus(reference.Recipe(path, out), 100 * 24, _WordTokenizer())
        docs = [json.loads(x) for x in (out / "text" / "train.jsonl").read_text().splitlines()]
        held = [json.loads(x) for x in (out / "text" / "heldout.jsonl").read_text().splitlines()]
        return manifest, docs, held

    manifest, docs, held = build(tmp_path / "a", 0)
    assert manifest["enough"] and "shuffled (seed 0)" in manifest["train"]["order"]
    assert [s["source"] for s in manifest["sources"]] == ["alpha", "beta", "gamma"]
    # the long document (document 43) in parts of at most 400 characters, not next to each other, which
    # joined give it back
    long = [d for d in docs if d["doc"] == 43]
    assert len(long) == 6 and all(len(d["text"]) <= 400 for d in long) and manifest["train"]["parts"] == len(docs)
    assert "\n\n".join(d["text"] for d in sorted(long, key=lambda d: d["part"])) == "beta document 3 " + \
        "\n\n".join(f"paragraph {j} " + "long " * 30 for j in range(12))
    at = sorted(docs.index(d) for d in long)
    assert max(b - a for a, b in zip(at, at[1:])) > 1
    # the same documents as the source-order split (every 10th held out), in another order
    train_ids = [d["doc"] for d in docs]
    assert sorted(set(train_ids)) == [i for i in range(max(train_ids) + 1) if i % 10 != 9]
    assert train_ids != sorted(train_ids)
    assert max(train_ids) >= 80  # the quota reaches into the third source
    assert all(d["doc"] % 10 == 9 for d in held) and not {d["doc"] for d in docs} & {d["doc"] for d in held}
    # held-out text is shuffled too: clt-eval reads only its first max_tokens
    assert {d["source"] for d in held} == {"alpha", "beta", "gamma"} and manifest["heldout"]["order"]
    assert [d["doc"] for d in held] != sorted(d["doc"] for d in held)
    # every source in the first quarter of the training text
    quarter = docs[: len(docs) // 4]
    assert {d["source"] for d in quarter} == {"alpha", "beta", "gamma"}
    # seeded: the same seed gives the same file, another seed another order
    assert build(tmp_path / "b", 0)[1] == docs
    other = build(tmp_path / "c", 1)[1]
    assert other != docs and sorted(d["doc"] for d in other) == sorted(train_ids)


def test_split_text_cuts_at_blank_lines_within_the_limit():
    text = "\n\n".join(["a" * 50, "b" * 30, "c" * 10, "d " * 60, "e" * 130])
    parts = reference.split_text(text, 100)
    assert all(len(p) <= 100 for p in parts)
    assert parts[0] == "a" * 50 + "\n\n" + "b" * 30 + "\n\n" + "c" * 10  # whole paragraphs while they fit
    assert parts[1].startswith("d d") and parts[-1] == "e" * 30 and len(parts) == 5  # cut at a space, else at the limit
    assert "".join(parts).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert reference.split_text("short", 100) == ["short"]


def test_plan_stops_training_before_the_sitting_ends(recipe, tmp_path):
    """--hours: the stop step is what fits in the time left after start-up and the last checkpoint."""
    out = tmp_path / "o"
    out.mkdir()
    r = reference.Recipe(recipe, out, wandb=False)
    settings = r.train_settings()
    rates = {"batch_tokens": 32, "generate_tok_s": 32.0, "clt_step_s": 2.0, "plt_step_s": 0.5, "startup_s": 10.0,
             "clt_params": 1000, "plt_params": 100, "n_layers": 4}
    p = reference.plan(r, settings, rates)
    assert p["step_s"] == pytest.approx(1.0 + 2.0 + 2 * 0.5)  # generation + CLT + two PLTs
    assert p["steps"] == 8 and p["seconds"]["train"] > 8 * p["step_s"]
    assert p["disk"]["checkpoints"] == (settings.keep_checkpoints + 1) * 12 * (1000 + 2 * 100)
    assert not any("write-through" in k for k in p["disk"])
    # --write-through: int8 shards of every training token, in the plan's disk
    w = reference.Recipe(recipe, out, write_through=True, wandb=False)
    ws = w.train_settings()
    assert ws.data.live.write_to == str(out / "shards") and ws.data.live.write_dtype == "int8"
    wp = reference.plan(w, ws, rates)
    assert wp["disk"]["write-through shards (int8)"] == wp["steps"] * 32 * reference.INT8_BYTES_PER_TOKEN


def test_a_sitting_is_not_cut_at_the_planned_step_time(recipe, tmp_path, monkeypatch, capsys):
    """--hours: the planned step time (measured at initialization, where activations are dense) was 2x the
    trained steps' time and stopped a sitting an hour early; training now runs to its end or its stop step,
    and only the deadline (SittingDeadline) ends it. A sitting where not even one planned step fits does not
    start."""
    import time

    from cltrain.train import trainer

    out = tmp_path / "o"
    out.mkdir()
    r = reference.Recipe(recipe, out, wandb=False)
    settings = r.train_settings()
    p = {"steps": 100, "step_s": 60.0, "startup_s": 0.0, "checkpoint_s": 0.0}
    calls = []
    monkeypatch.setattr(trainer, "train", lambda cfg: calls.append(cfg.get("stop_at_step")))
    assert reference.stage_train(r, settings, p, time.time() + 600, None) is False  # 10 planned steps fit
    assert calls == [None]  # no stop step: the deadline decides
    assert reference.stage_train(r, settings, p, time.time() + 600, 40) is False and calls[-1] == 40
    assert reference.stage_train(r, settings, p, time.time() + 30, None) is False and len(calls) == 2
    # a stop signal from elsewhere (a scheduler's SIGTERM) before the deadline is not called the sitting's time
    from cltrain.train.lifecycle import Preempted

    def preempted(cfg):
        raise Preempted("SIGTERM")

    monkeypatch.setattr(trainer, "train", preempted)
    capsys.readouterr()
    assert reference.stage_train(r, settings, p, time.time() + 600, None) is False
    printed = capsys.readouterr().out
    assert "sent a stop signal" in printed and "--hours" not in printed
    # the plan's time left comes from the run's own pace once it has one: the median of its last logged steps
    assert reference.measured_step_s(settings, 32) is None
    first = reference.dictionary_dirs(settings)[0]
    first.mkdir(parents=True)
    rows = [{"step": i, "tokens_per_s": v} for i, v in enumerate([1.0] * 20 + [8.0, 4.0, 16.0, 2.0, 4.0])]
    (first / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert reference.measured_step_s(settings, 32, last=5) == 32 / 4.0


def test_sitting_deadline_signals_only_under_the_trainers_handler(monkeypatch):
    """--hours' hard stop: SIGUSR1 at the deadline, but only while clt-train's stop handler is installed
    (SIGUSR1's default action would end the process); until then it waits, and cancel() ends it."""
    import signal
    import time

    from cltrain.train.lifecycle import StopSignals
    from cltrain.train.reference import SittingDeadline

    monkeypatch.setattr(SittingDeadline, "RETRY_S", 0.05)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        d = SittingDeadline(time.time())  # due now, no handler yet: must not signal (it would end pytest)
        time.sleep(0.3)
        stop = StopSignals()
        with stop:  # the trainer's handler: the next retry signals it
            for _ in range(100):
                if stop.signum is not None:
                    break
                time.sleep(0.02)
        assert stop.signum == signal.SIGUSR1 and d.fired  # the driver then says the sitting's time is up
        d.cancel()
        late = SittingDeadline(time.time() + 0.2)
        late.cancel()
        with StopSignals() as quiet:
            time.sleep(0.4)
        assert quiet.signum is None and not late.fired  # cancelled before its time: no signal
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_make_reference_reports_bad_input_in_one_line(tmp_path):
    """`python -m cltrain.train.reference` (make reference) runs under the console commands' exit handling:
    a recipe missing a key (here; as for a checkpoint of another config) is one line naming it, exit 2."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: tiny-llama\n")
    r = subprocess.run([sys.executable, "-m", "cltrain.train.reference", "--recipe", str(bad), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == f"make reference: error: {bad}: recipe key 'text' is missing"
