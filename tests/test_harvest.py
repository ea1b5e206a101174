"""clt-harvest (train/harvest.py): shards from a tiny model, resume after a crash, 2 ranks, text sources."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cltrain.train import harvest as harvest_mod
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.data import ActivationLoader, DatasetInfo, read_samples
from cltrain.train.lm import byte_tokenizer, load_lm, mlp_sites
from cltrain.train.text import documents

pytestmark = pytest.mark.timeout(180)

SMALL = ["base_model=tiny-gpt2", "max_tokens=2048", "context=64", "batch_size=4", "tokens_per_sample=16",
         "shard_tokens=256", "shuffle_buffer=512", "scale_tokens=300", "threads=1"]


def cfg_for(out, *extra):
    return compose("harvest", SMALL + [f"out_dir={out}", *extra])


def all_tokens(info):
    """{(ctx, pos): (token id, doc, x, y)} over every sample of the dataset."""
    seen = {}
    for url in info.shard_urls("all"):
        for _, t, meta in read_samples(url):
            assert meta["model"] == "tiny-gpt2"
            for i, (c, p) in enumerate(zip(t["ctx"].tolist(), t["pos"].tolist())):
                assert (c, p) not in seen, f"token (context {c}, position {p}) written twice"
                seen[(c, p)] = (int(t["token_ids"][i]), int(t["doc"][i]), t["x"][i], t["y"][i])
    return seen


def test_harvest_writes_what_the_model_computes(tmp_path):
    info = harvest_mod.harvest(cfg_for(tmp_path / "h"))
    again = DatasetInfo.load(tmp_path / "h")
    assert again.to_json() == info.to_json()
    assert info.model == "tiny-gpt2" and info.layers == [0, 1, 2, 3] and info.d_model == 32
    assert info.hooks["x"] == "transformer.h.{l}.ln_2:input" and info.hooks["y"] == "transformer.h.{l}.mlp:output"
    h = info.harvest
    assert h["tokens_fed"] == 2048 == h["contexts"] * 64
    assert info.n_tokens + h["bos_dropped"] + h["tail_dropped"] == 2048 and h["tail_dropped"] < 16
    assert info.scale_tokens == 300 and "rank 0" in info.scale_source
    assert all(s["n_tokens"] == 256 for s in info.shards[:-1])

    seen = all_tokens(info)
    assert len(seen) == info.n_tokens
    assert all(tok != 256 for tok, *_ in seen.values())  # BOS dropped
    # shuffled across documents: the first shard mixes many contexts, out of order
    first = torch.cat([t["ctx"] for _, t, _ in read_samples(info.shard_urls("all")[0])]).tolist()
    assert len(set(first)) >= 8 and first != sorted(first)

    # The stored values are the model's own x_l, y_l (recomputed here for context 5), cast to bf16.
    model, tok = load_lm("tiny-gpt2", seed=0)
    ctx_ids = {p: tok_id for (c, p), (tok_id, *_) in seen.items() if c == 5}
    from cltrain.train.text import documents as docs
    from cltrain.train.harvest import contexts
    ids = next(ids for i, (ids, _) in enumerate(contexts(docs("builtin"), tok, 64)) if i == 5)
    assert all(ids[p] == t for p, t in ctx_ids.items()) and ids[0] == 256
    xs, ys = {}, {}
    for s in mlp_sites(model):
        s.input_module.register_forward_pre_hook(lambda m, a, l=s.layer: xs.__setitem__(l, a[0][0]))
        s.output_module.register_forward_hook(lambda m, a, o, l=s.layer: ys.__setitem__(l, o[0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for p in list(ctx_ids)[:10]:
        _, _, x, y = seen[(5, p)]
        assert torch.equal(x, torch.stack([xs[l][p] for l in range(4)]).bfloat16())
        assert torch.equal(y, torch.stack([ys[l][p] for l in range(4)]).bfloat16())

    # The loader reads it; on the tokens the scales came from, E||s x_l|| = sqrt(D)
    b = next(iter(ActivationLoader(info, info.n_tokens, epochs=1)))
    assert b.x.shape == (info.n_tokens, 4, 32)
    for v in (b.x, b.y):
        norms = v.norm(dim=-1).mean(0)
        assert ((norms / math.sqrt(32)) - 1).abs().max() < 0.25


def test_layer_range_and_normalized_input(tmp_path):
    info = harvest_mod.harvest(cfg_for(tmp_path / "h", "layers=[1,2]", "x_source=normalized", "base_model=tiny-llama",
                                       "bos=keep", "dtype=float16"))
    assert info.layers == [1, 2] and info.n_layers == 2 and info.dtype == "float16"
    assert info.hooks["x"] == "model.layers.{l}.post_attention_layernorm:output"
    assert info.harvest["bos_dropped"] == 0 and info.harvest["bos_token_id"] == 256
    _, t, meta = next(read_samples(info.shard_urls("all")[0]))
    assert meta["model"] == "tiny-llama" and t["x"].shape == (16, 2, 32) and t["x"].dtype == torch.float16
    with pytest.raises(ConfigError, match=r"config key 'layers' = \[2, 9\]: tiny-gpt2 has 4 MLP layers"):
        harvest_mod.harvest(cfg_for(tmp_path / "h2", "layers=[2,9]"))


def test_resume_after_a_crash_is_identical(tmp_path, monkeypatch):
    ref = harvest_mod.harvest(cfg_for(tmp_path / "ref"))
    real, calls = harvest_mod._write_progress, []

    def crash_on_second_record(out, rank, prog):
        calls.append(1)
        if len(calls) == 2:  # the second flush wrote its shards but dies before recording them
            raise KeyboardInterrupt("simulated crash")
        real(out, rank, prog)

    monkeypatch.setattr(harvest_mod, "_write_progress", crash_on_second_record)
    with pytest.raises(KeyboardInterrupt):
        harvest_mod.harvest(cfg_for(tmp_path / "run"))
    monkeypatch.setattr(harvest_mod, "_write_progress", real)
    (tmp_path / "run" / ".acts-000004.tar.tmp-999").write_bytes(b"half a shard")  # as a kill mid-write leaves
    prog = json.loads((tmp_path / "run" / ".progress-rank0000.json").read_text())
    assert not prog["done"] and 0 < prog["contexts_done"] < 32 and prog["carry"]
    resumed = harvest_mod.harvest(cfg_for(tmp_path / "run"))
    assert resumed.shards == ref.shards  # same names, token counts and sha256: no token lost or repeated
    assert resumed.scale_x == ref.scale_x and resumed.n_tokens == ref.n_tokens
    assert not list((tmp_path / "run").glob(".carry-*")) and not list((tmp_path / "run").glob(".*.tmp*"))
    # a finished harvest run again changes nothing; other settings are refused
    assert harvest_mod.harvest(cfg_for(tmp_path / "run")).shards == ref.shards
    with pytest.raises(ConfigError, match=r"config key 'context' = 32 but .*progress-rank0000.json was harvested with context=64"):
        harvest_mod.harvest(cfg_for(tmp_path / "run", "context=32"))


def test_two_ranks_harvest_disjoint_slices(tmp_path):
    """Two real processes (RANK/WORLD_SIZE as torchrun sets them) write the same tokens as one."""
    one = harvest_mod.harvest(cfg_for(tmp_path / "one"))
    out = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-m", "cltrain.train.harvest", *SMALL, f"out_dir={out}"],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-2000:]
    two = DatasetInfo.load(out)
    names = [s["name"] for s in two.shards]
    assert any(n.endswith("000000.tar") for n in names) and any(n.endswith("000001.tar") for n in names)
    a, b = all_tokens(one), all_tokens(two)
    # the same contexts were fed; only the tails (< T tokens per rank) dropped at the end may differ
    assert len(b) + two.harvest["tail_dropped"] == len(a) + one.harvest["tail_dropped"]
    assert len(a.keys() - b.keys()) <= two.harvest["tail_dropped"] and len(b.keys() - a.keys()) <= one.harvest["tail_dropped"]
    for k in a.keys() & b.keys():
        assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) and torch.equal(a[k][3], b[k][3])
    assert two.harvest["world_size"] == 2 and two.harvest["tokens_fed"] == 2048


def test_text_sources_and_contexts(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nline two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    assert list(documents(str(tmp_path))) == ["first document\nline two\n", "second", "third"]
    assert list(documents(str(tmp_path / "b.jsonl"))) == ["second", "third"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a string under key 'text'"):
        list(documents(str(tmp_path / "bad.jsonl")))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(documents(str(tmp_path / "nope.txt")))
    builtin = documents("builtin")
    assert "statement" in next(builtin)  # real English: Python's language reference

    tok = byte_tokenizer()
    ctxs = list(harvest_mod.contexts(iter(["abcdef", "ghijkl"]), tok, 5))
    assert [bytes(i for i in ids if i < 256) for ids, _ in ctxs] == [b"abcd", b"efg", b"hijk"]
    assert [ids[0] for ids, _ in ctxs] == [256, 256, 256]  # every context starts with BOS
    assert ctxs[1][0] == [256, ord("e"), ord("f"), 256, ord("g")]  # documents separated by BOS
    assert ctxs[1][1] == [0, 0, 0, 1, 1]


def test_dry_run_and_bad_config(tmp_path, capsys):
    assert harvest_mod.harvest(cfg_for(tmp_path / "dry", "dry_run=true", "max_tokens=100000")) is None
    out = capsys.readouterr().out
    assert "dry run" in out and "GB" in out and not (tmp_path / "dry").exists()
    est = harvest_mod.estimate(cfg_for(tmp_path, "max_tokens=1280000", "context=128", "dtype=bfloat16"), 30, 576)
    assert est["tokens"] == 10000 * 127 and est["bytes_per_token"] == 2 * 30 * 576 * 2 + 32
    with pytest.raises(ConfigError, match="config key 'shard_tokens' = 100: expected a multiple of tokens_per_sample=16"):
        harvest_mod.harvest(cfg_for(tmp_path / "x", "shard_tokens=100"))
