"""The feature browser (train/feature_browser.py): the files it writes, read back here, and its pages rendered
by a real browser (headless Chromium, --dump-dom and --screenshot) from file:// URLs, as a reader opens them.

The browser tests skip without chromium / chromium-browser / google-chrome on PATH: install it with
`apt-get install chromium` or tests/install_browser.sh (which `make test` runs)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cltrain.train.feature_browser import write_browser

TRICKY = '<b>&"'  # would become a <b> element if data were ever parsed as HTML
PROMPT = ["<|endoftext|>", "The", " capital", " of", " France", " is"]


def _example(tokens, acts, at, repeated=False):
    return {"tokens": tokens, "tokens_acts_list": acts, "train_token_ind": at, "is_repeated_datapoint": repeated}


def _record(layer: int, feature: int, dead=False, dense=False) -> dict:
    base = 1.0 + layer + feature / 10
    top = [" Paris", "<i>x</i>", " caf\u00e9", "\u65e5\u672c", f" L{layer}F{feature}", " six"]
    if dead:
        groups, hist, lo, hi, freq = [], [0.0] * 50, 0.0, 0.0, 0.0
    else:
        hist = [float((i * 7 + feature) % 5) for i in range(50)]
        lo, hi, freq = 0.1, 2 * base, 0.5 if dense else 0.01 * (feature + 1)
        groups = [
            {"quantile_name": "Top activations", "examples": [
                _example([" the", TRICKY, "\n", " caf\u00e9", "\u65e5\u672c"], [0.0, hi, hi / 2, 0.0, 0.1], 1),
                _example([" a", f" tok{layer}{feature}", " b"], [0.2, hi * 0.9, 0.0], 1)]},
            {"quantile_name": "Quantile 1 of 5", "examples": [
                _example([" low", f" q{layer}{feature}"], [0.0, 0.3], 1, repeated=True)]}]
    return {"transcoder_id": "cltrain-clt", "index": (layer + feature) * (layer + feature + 1) // 2 + feature,
            "layer": layer, "feature": feature, "dead": dead, "dense": dense, "activation_frequency": freq,
            "act_min": lo, "act_max": hi, "quantile_values": [lo + (hi - lo) * q / 100 for q in range(1, 101)],
            "histogram": hist, "top_logits": top, "bottom_logits": [" never", "\u00bf", f" B{layer}{feature}"],
            "examples_quantiles": groups}


def _layer_records(layer: int) -> list[dict]:
    # Layer 0: feature 2 dead, feature 3 dense.
    return [_record(layer, f, dead=(layer, f) == (0, 2), dense=(layer, f) == (0, 3)) for f in range(4)]


META = {
    "title": "CLT features: runs/demo/clt", "model": "smollm2", "kind": "CLT", "n_layers": 2, "n_features": 4,
    "layers": [5, 6], "tokens": 65536, "contexts": 1024, "dense_threshold": 0.1,
    "per_layer": [{"layer": 0, "dead": 1, "dense": 1, "mean_frequency": 0.012, "median_frequency": 0.004},
                  {"layer": 1, "dead": 0, "dense": 0, "mean_frequency": 0.02, "median_frequency": 0.01}],
    "logits_note": "direct effect through the unembedding",
    "graphs": [{"slug": "prompt-00-fact", "prompt": "The capital of France is", "prompt_tokens": PROMPT,
                "replacement_score": 0.5, "completeness_score": 0.8,
                "top_features": [{"layer": 1, "feature": 2, "ctx_idx": 4, "influence": 0.12, "activation": 2.3},
                                 {"layer": 0, "feature": 1, "ctx_idx": 2, "influence": 0.05, "activation": 1.5}]}],
}


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Path:
    """The browser for META and two layers of _layer_records; its index.html."""
    folder = tmp_path_factory.mktemp("browser") / "features"
    return write_browser(folder, META, ((layer, _layer_records(layer)) for layer in range(2)))


def _unwrap(path: Path, prefix: str):
    """The JSON inside `prefix(...);` of a data script."""
    text = path.read_text("ascii")  # ensure_ascii: the data files are pure ASCII
    assert text.startswith(prefix) and text.endswith(");\n"), text[:80]
    return json.loads(text[len(prefix):-3])


# ----------------------------------------------------------------------------------------------------
# The files, read back without a browser


def test_files_written(browser):
    folder = browser.parent
    assert browser == folder / "index.html"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert names == {"index.html", "browser.js", "browser.css", "data/meta.js", "data/layer_0.js", "data/layer_1.js"}
    html = browser.read_text()
    assert '<script src="browser.js"></script>' in html and '<script src="data/meta.js"></script>' in html
    code = (folder / "browser.js").read_text()
    assert "fetch(" not in code and "XMLHttpRequest" not in code  # blocked for file:// URLs: <script> only


def test_nothing_from_the_network(browser):
    for path in browser.parent.rglob("*"):
        if path.is_file():
            text = path.read_text("utf-8").lower()
            for needle in ("http://", "https://", "//cdn", "@import", "url(", "@font-face"):
                assert needle not in text, f"{path.name} contains {needle!r}"


def test_data_round_trip(browser, tmp_path):
    data = browser.parent / "data"
    assert _unwrap(data / "meta.js", "window.cltFeatures.meta(") == META
    for layer in range(2):
        assert _unwrap(data / f"layer_{layer}.js", f"window.cltFeatures.layer({layer},") == _layer_records(layer)
    # Line separators U+2028/U+2029 end a line in older JavaScript: they must not appear raw.
    folder = write_browser(tmp_path / "seps", {**META, "title": "a\u2028b\u2029c"}, []).parent
    assert "\\u2028" in (folder / "data" / "meta.js").read_text("ascii")


def test_layers_written_as_they_come(tmp_path):
    folder = tmp_path / "out"

    def layers():
        yield 0, _layer_records(0)
        # The consumer wrote layer 0 before asking for layer 1: nothing is held back.
        assert (folder / "data" / "layer_0.js").exists()
        yield 1, _layer_records(1)

    write_browser(folder, META, layers())
    assert (folder / "data" / "layer_1.js").exists()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="records of layer 1 include feature 0 of layer 0"):
        write_browser(tmp_path / "out", META, [(1, _layer_records(0))])
    with pytest.raises(ValueError, match="meta lacks n_layers, layers"):
        write_browser(tmp_path / "out", {k: v for k, v in META.items() if k not in ("n_layers", "layers")}, [])
    with pytest.raises(TypeError, match="layer 0.5 is not an integer"):
        write_browser(tmp_path / "out", META, [(0.5, [])])


# ----------------------------------------------------------------------------------------------------
# The pages in headless Chromium

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Element:
    def __init__(self, tag: str, attrs: dict, parent: Element | None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)]

    def id(self, name: str) -> Element:
        found = [e for e in self.iter() if e.attrs.get("id") == name]
        assert len(found) == 1, f"{len(found)} elements with id {name!r}"
        return found[0]


class _Tree(HTMLParser):
    """The dumped DOM as a tree of Elements (the standard library's parser, so no dependency)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.open = Element("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Element(tag, dict(attrs), self.open)
        self.open.children.append(node)
        if tag not in VOID:
            self.open = node

    def handle_startendtag(self, tag, attrs):
        self.open.children.append(Element(tag, dict(attrs), self.open))

    def handle_endtag(self, tag):
        node = self.open
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.open = node.parent

    def handle_data(self, data):
        self.open.children.append(data)


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium, chromium-browser or google-chrome on PATH for the browser tests: install one with "
                "`apt-get install chromium` (or run tests/install_browser.sh)")


def headless(chromium: str, tmp_path: Path, url: str, *extra: str, budget_ms: int = 5000, timeout: float = 60):
    """Chromium's DOM of `url` after `budget_ms` of virtual time (subprocess.run's result), run in tmp_path
    with a fresh profile there. Chromium always starts crashpad handlers, which detach (a session of their
    own, parent init) and end just after the browser; with XDG_CONFIG_HOME in tmp_path their crash database
    is there, which names them, and the test waits for them (ends them by PID after 10 s) so nothing it
    started outlives it."""
    config = tmp_path / "chromium-config"
    args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            f"--virtual-time-budget={budget_ms}", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom",
            *extra, url]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              env={**os.environ, "XDG_CONFIG_HOME": str(config)})
    finally:
        _end_processes_naming(str(config), grace=10.0)


def _end_processes_naming(marker: str, grace: float):
    """Wait up to `grace` seconds for the processes whose command line contains `marker` to end, then end
    those left (SIGKILL, by PID)."""
    def left() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if marker.encode() in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
                except OSError:  # ended meanwhile, or not ours to read
                    pass
        return pids

    deadline = time.monotonic() + grace
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _render(chromium: str, index: Path, hash_: str, tmp_path: Path, screenshot: Path | None = None) -> Element:
    """The page at index.html#hash_ after load, as Chromium's DOM; checks that a view finished with no JS error."""
    extra = [f"--screenshot={screenshot}", "--window-size=1200,900"] if screenshot else []
    url = index.resolve().as_uri() + (f"#{hash_}" if hash_ else "")
    # stderr carries harmless noise (dbus and the like): only the exit status and the DOM count.
    run = headless(chromium, tmp_path, url, *extra)
    assert run.returncode == 0, f"chromium exited {run.returncode}: {run.stderr[-2000:]}"
    tree = _Tree()
    tree.feed(run.stdout)
    tree.close()
    body = tree.root.all("body")[0]
    assert "data-error" not in body.attrs, f"JavaScript error: {body.attrs['data-error']}"
    assert body.attrs.get("data-ready") == "1", f"no view finished rendering:\n{run.stdout[-3000:]}"
    return tree.root


def _texts(nodes: list[Element]) -> list[str]:
    return [n.text for n in nodes]


def _shown(token: str) -> str:
    return token.replace("\n", "\u23ce")


def test_feature_page(chromium, browser, tmp_path):
    shot = tmp_path / "feature.png"
    dom = _render(chromium, browser, "feature=0/1", tmp_path, screenshot=shot)
    record = _layer_records(0)[1]
    assert dom.all("body")[0].attrs["data-view"] == "feature"
    assert dom.id("feature-title").text == "Layer 0 (model layer 5) \u00b7 feature 1"
    assert not dom.id("feature-title").all("span", "badge")
    assert f"index {record['index']}" in dom.id("feature-stats").text
    assert _texts(dom.id("top-logits").all("span", "chip")) == record["top_logits"]
    assert _texts(dom.id("bottom-logits").all("span", "chip")) == record["bottom_logits"]
    assert "direct effect through the unembedding" in dom.id("main").text

    hist = dom.id("histogram")
    assert hist.tag == "svg" and len(hist.all("rect", "bar")) == sum(c > 0 for c in record["histogram"])

    groups = record["examples_quantiles"]
    assert _texts(dom.id("examples").all("h3")) == [g["quantile_name"] for g in groups]
    examples = dom.id("examples").all("div", "example")
    expected = [ex for g in groups for ex in g["examples"]]
    assert len(examples) == len(expected)
    for shown_ex, ex in zip(examples, expected):
        toks = shown_ex.all("span", "tok")
        assert _texts(toks) == [_shown(t) for t in ex["tokens"]]
        assert [i for i, t in enumerate(toks) if "max" in t.classes] == [ex["train_token_ind"]]
        assert ("repeated" in shown_ex.classes) == ex["is_repeated_datapoint"]
    first = examples[0].all("span", "tok")
    # The data's '<b>&"' is text in a token, not markup: no <b> anywhere in the page's content.
    assert first[1].text == TRICKY and "max" in first[1].classes and not dom.id("main").all("b")
    assert not dom.id("top-logits").all("i")
    assert first[1].attrs["title"] == '"<b>&\\"": 2.20'  # the token as JSON and its activation (act_max 2.2)
    # Shading by activation / act_max: the max token full, the newline (half of it) half, zero unshaded.
    assert "rgb(255, 140, 0)" in first[1].attrs["style"]
    assert "rgba(255, 140, 0, 0.5)" in first[2].attrs["style"] and first[2].text == "\u23ce"
    assert "style" not in first[0].attrs

    nav = {a.attrs.get("id"): a.attrs["href"] for a in dom.all("nav")[0].all("a")}
    assert nav["prev-feature"] == "#feature=0/0" and nav["next-feature"] == "#feature=0/2"
    assert nav["layer-link"] == "#layer=0"

    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_layer_page(chromium, browser, tmp_path):
    dom = _render(chromium, browser, "layer=0", tmp_path)
    assert dom.id("layer-title").text == "Layer 0 (model layer 5)"
    rows = dom.id("layer-table").all("tbody")[0].all("tr")
    assert [r.all("a")[0].attrs["href"] for r in rows] == [f"#feature=0/{f}" for f in range(4)]
    assert [("dead" in r.classes, "dense" in r.classes) for r in rows] == [
        (False, False), (False, False), (True, False), (False, True)]
    assert _texts(rows[2].all("span", "badge")) == ["dead"] and "dead" in rows[2].all("span", "badge")[0].classes
    assert _texts(rows[3].all("span", "badge")) == ["dense"]
    assert not rows[0].all("span", "badge")
    record = _layer_records(0)[1]
    top_tokens, top_logits = rows[1].all("td", "top-tokens")[0], rows[1].all("td", "top-logits")[0]
    assert _texts(top_tokens.all("span", "chip")) == [TRICKY, " tok01"]
    assert _texts(top_logits.all("span", "chip")) == record["top_logits"][:5]
    assert not rows[2].all("td", "top-tokens")[0].all("span")  # dead: no examples, no tokens
    assert rows[1].all("td", "num")[0].text == "2.00%"


def test_graph_page(chromium, browser, tmp_path):
    dom = _render(chromium, browser, "graph=prompt-00-fact", tmp_path)
    assert "prompt-00-fact" in dom.id("graph-title").text
    assert _texts(dom.id("graph-prompt").all("span", "tok")) == PROMPT
    assert "0.500" in dom.id("graph-scores").text and "0.800" in dom.id("graph-scores").text
    rows = dom.id("graph-table").all("tbody")[0].all("tr")
    top = META["graphs"][0]["top_features"]
    assert len(rows) == len(top)
    for row, t in zip(rows, top):
        assert f"#feature={t['layer']}/{t['feature']}" in [a.attrs["href"] for a in row.all("a")]
        cells = row.all("td")
        assert cells[3].text == f"{t['ctx_idx']} {PROMPT[t['ctx_idx']]}"
        # Filled from the feature's layer file, loaded for this view.
        logits = _layer_records(t["layer"])[t["feature"]]["top_logits"][:5]
        assert _texts(row.all("td", "top-logits")[0].all("span", "chip")) == logits


def test_overview(chromium, browser, tmp_path):
    dom = _render(chromium, browser, "", tmp_path)
    assert dom.all("title")[0].text == META["title"] and dom.id("title").text == META["title"]
    summary = dom.id("summary").text
    assert "smollm2" in summary and "CLT" in summary and "65,536" in summary and "1,024" in summary
    rows = dom.id("summary-table").all("tbody")[0].all("tr")
    assert [r.all("a")[0].attrs["href"] for r in rows] == ["#layer=0", "#layer=1"]
    assert [r.all("td")[1].text for r in rows] == ["1", "0"]
    links = dom.id("graph-list").all("a")
    assert [(a.attrs["href"], a.text) for a in links] == [("#graph=prompt-00-fact", "The capital of France is")]


def test_dead_feature(chromium, browser, tmp_path):
    dom = _render(chromium, browser, "feature=0/2", tmp_path)
    assert _texts(dom.id("feature-title").all("span", "badge")) == ["dead"]
    assert not dom.id("histogram").all("rect") and "no activations" in dom.id("histogram").text
    assert _texts(dom.id("top-logits").all("span", "chip")) == _layer_records(0)[2]["top_logits"]
    assert not dom.id("examples").all("div", "example") and "No examples" in dom.id("examples").text


def test_dead_only_layer_with_empty_groups(chromium, tmp_path):
    # A layer whose one feature is dead, its quantile groups present but empty.
    record = {**_record(0, 0, dead=True), "examples_quantiles": [{"quantile_name": "Top activations", "examples": []}]}
    meta = {**META, "n_layers": 1, "n_features": 1, "layers": [0], "per_layer": META["per_layer"][:1], "graphs": []}
    index = write_browser(tmp_path / "dead", meta, [(0, [record])])
    dom = _render(chromium, index, "feature=0/0", tmp_path)
    assert dom.id("feature-title").children[0] == "Layer 0 \u00b7 feature 0"  # model layer 0 is layer 0: no note
    assert "dead" in dom.id("feature-title").all("span", "badge")[0].classes
    assert "No examples" in dom.id("examples").text and not dom.id("examples").all("h3")
    assert not [a for a in dom.all("nav")[0].all("a") if a.attrs.get("id") in ("prev-feature", "next-feature")]


def test_missing_feature_and_layer_file(chromium, browser, tmp_path):
    dom = _render(chromium, browser, "feature=0/99", tmp_path)
    assert _texts(dom.id("main").all("p", "error")) == ["Layer 0 (model layer 5) has no feature 99."]
    folder = tmp_path / "copy"
    shutil.copytree(browser.parent, folder)
    (folder / "data" / "layer_1.js").unlink()
    dom = _render(chromium, folder / "index.html", "layer=1", tmp_path)
    assert re.search(r"data/layer_1\.js did not load", dom.id("main").text)
