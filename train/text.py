"""Text sources for clt-harvest: local .txt/.jsonl files, a Hugging Face dataset, or built-in offline text.

The built-in source needs no network and no extra package: it is real English prose that ships with
Python itself, in a fixed order:
  1. the Python Language Reference topics in the stdlib module `pydoc_data.topics` (~465 KB, what
     `help("if")` shows), one document per topic;
  2. then the docstrings of the standard library's own .py files (read with `ast`, never imported),
     one document per module, for a few more MB.
Every source yields (document index, text) in a deterministic order, so every harvest rank sees the
same documents and takes its own slice of the contexts built from them.
"""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Iterator

TEXT_EXTS = (".txt", ".jsonl")


def builtin_documents() -> Iterator[str]:
    from pydoc_data.topics import topics
    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d) > 40)
        if text:
            yield text


def file_documents(path: Path, key: str = "text", chunk_chars: int = 1 << 20) -> Iterator[str]:
    """A .txt file is one document (read in ~1 MB pieces cut at line ends); a .jsonl file holds one
    document per line, its text under `key`."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                    raise ValueError(f"{path}:{n}: expected an object with a string under key {key!r} "
                                     f"(harvest option text.key)")
                yield obj[key]
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                piece = f.read(chunk_chars)
                if not piece:
                    break
                piece += f.readline()
                yield piece


def hf_documents(name: str, config: str | None, split: str, key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"text source 'hf:{name}' needs the `datasets` package (pip install datasets) "
                          f"and network access") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in ds:
        if key not in row:
            raise ValueError(f"Hugging Face dataset {name}: rows have no column {key!r} (found {sorted(row)}); "
                             f"set text.key")
        yield row[key]


def documents(source: str, key: str = "text", hf_config: str | None = None, hf_split: str = "train") -> Iterator[str]:
    """Documents of a text source: 'builtin', a .txt/.jsonl file, a folder of them, or 'hf:NAME'."""
    if source == "builtin":
        yield from builtin_documents()
        return
    if source.startswith("hf:"):
        yield from hf_documents(source[3:], hf_config, hf_split, key)
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_EXTS and p.is_file())
        if not files:
            raise FileNotFoundError(f"text source {source}: no .txt or .jsonl files in this folder")
    elif path.is_file():
        if path.suffix not in TEXT_EXTS:
            raise ValueError(f"text source {source}: expected a .txt or .jsonl file")
        files = [path]
    else:
        raise FileNotFoundError(f"text source {source}: no such file or folder (or use 'builtin' or 'hf:NAME')")
    for f in files:
        yield from file_documents(f, key)


def describe(source: str) -> str:
    if source == "builtin":
        return "builtin: Python's pydoc_data.topics, then stdlib docstrings (train/text.py)"
    return source
