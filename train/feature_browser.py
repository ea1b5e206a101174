"""The feature browser: a trained CLT's feature pages as static files that work offline, opened from disk.

    path = write_browser(out / "features", meta, layers)     # then open path (index.html) in any browser,
                                                              # e.g. file:///.../features/index.html#feature=3/17

Written into the folder:
    index.html, browser.css, browser.js     the page, its style and its code (plain HTML, CSS and JavaScript)
    data/meta.js                            window.cltFeatures.meta({...}): the run, per-layer statistics, graphs
    data/layer_<L>.js                       window.cltFeatures.layer(L, [...]): one record per feature of layer L
Data files are scripts that call back into the page rather than .json files because browsers block fetch()
of file:// URLs, while <script src> loads them; a layer's file is loaded the first time a view needs it.
Nothing comes from the network: no CDN, no web fonts, no URL at all in the output.

Views, one page routed by its hash: the overview (default), #layer=L, #feature=L/F and #graph=SLUG (L is the
CLT layer, i.e. position L in meta["layers"], the model's layer numbers; meta["per_layer"][L] describes it).
Records are circuit-tracer's feature JSON with extra keys (layer, feature, dead, dense, act_min, act_max,
quantile_values, histogram, top_logits, bottom_logits, examples_quantiles). Token strings are only ever set
as text, never parsed as HTML. After a view has rendered, <body data-ready="1" data-view="..."> says so, and
an uncaught error is written to <body data-error="...">, for headless checks (chromium --dump-dom).
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Iterable

from cltrain.files import atomic_write_bytes

INDEX_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>CLT features</title>
<link rel="stylesheet" href="browser.css">
</head>
<body>
<header><a href="#" id="home">CLT feature browser</a></header>
<main id="main"><p class="note">Loading data/meta.js&hellip;</p></main>
<noscript><p class="error">This page draws its views with JavaScript: enable it to read them.</p></noscript>
<script src="browser.js"></script>
<script src="data/meta.js"></script>
</body>
</html>
"""

# System fonts only: a web font would be a download.
BROWSER_CSS = """body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1150px; margin: 0 auto; padding: 0 16px 48px; }
header { padding: 8px 0; border-bottom: 1px solid #ddd; margin-bottom: 8px; }
a { color: #0b5cad; text-decoration: none; }
a:hover { text-decoration: underline; }
nav a { margin-right: 1.2em; }
h1 { font-size: 22px; margin: 12px 0 6px; }
h2 { font-size: 16px; margin: 18px 0 6px; }
h3 { font-size: 14px; margin: 14px 0 4px; color: #444; }
table { border-collapse: collapse; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f6f6f6; }
th.sortable { cursor: pointer; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.dead td { color: #999; }
.badge { font-size: 11px; padding: 0 5px; border-radius: 3px; margin-left: 6px; vertical-align: middle;
         color: #fff; font-weight: normal; }
.badge.dead { background: #777; }
.badge.dense { background: #c0392b; }
.tok, .chip { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
.chip { display: inline-block; background: #eef2f7; border: 1px solid #d5dde8; border-radius: 3px;
        padding: 0 4px; margin: 1px 2px; font-size: 12px;
        max-width: 14em; overflow: hidden; text-overflow: ellipsis; vertical-align: bottom; }
.example { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9;
           padding: 3px 6px; border-bottom: 1px solid #f0f0f0; }
.example.repeated { opacity: 0.4; }
.tok { border-radius: 2px; }
.tok.max { outline: 2px solid #a04000; font-weight: bold; }
#graph-prompt .tok { background: #f1f1f1; margin-right: 1px; }
#histogram { display: block; margin: 8px 0; }
#histogram .bar { fill: #e67e22; }
#histogram .axis { stroke: #999; }
#histogram text { font-size: 11px; fill: #555; }
.note { color: #666; }
#circuits { display: grid; grid-template-columns: 1fr 1fr; gap: 0 24px; }
#circuits > p { grid-column: 1 / -1; }
.error { color: #b00000; font-weight: bold; }
"""

# Plain JavaScript, no library; \u escapes keep the file ASCII whatever encoding the browser assumes.
BROWSER_JS = r"""/* The feature browser's views, routed by the page's hash: #layer=L, #feature=L/F, #graph=SLUG, else the
   overview. Data comes from <script src="data/..."> calling window.cltFeatures.meta / .layer (browsers
   block fetching file:// URLs). Data only ever becomes text (textContent, attributes): tokens hold "<", "&". */
"use strict";
(function () {
  var meta = null, layers = {}, pending = {}, view = 0;
  var main = document.getElementById("main");
  // The SVG namespace from the HTML parser itself, so that the output holds no URL at all.
  var SVG = (function () { var d = document.createElement("div"); d.innerHTML = "<svg></svg>"; return d.firstChild.namespaceURI; })();

  window.onerror = function (message, source, line) {
    document.body.dataset.error = message + " (" + source + ":" + line + ")";
  };
  window.cltFeatures = {
    meta: function (m) { meta = m; document.title = m.title; route(); },
    layer: function (l, records) {
      layers[l] = records;
      var waiting = pending[l] || [];
      delete pending[l];
      waiting.forEach(function (done) { done(records); });
    }
  };
  window.addEventListener("hashchange", route);
  window.addEventListener("load", function () { if (!meta) fail("data/meta.js did not load: is it next to index.html?"); });

  // Calls done(records) once data/layer_L.js has run (injected on the first request only), done(null) if it failed.
  function loadLayer(l, done) {
    if (layers[l]) return done(layers[l]);
    if (pending[l]) return pending[l].push(done);
    pending[l] = [done];
    var script = document.createElement("script");
    script.src = "data/layer_" + l + ".js";
    script.onerror = function () {
      var waiting = pending[l] || [];
      delete pending[l];
      waiting.forEach(function (d) { d(null); });
    };
    document.head.appendChild(script);
  }

  // A callback that does nothing once the reader has moved on to another view.
  function later(f) { var mine = view; return function (x) { if (mine === view) f(x); }; }
  // The view is complete: for people waiting, and for headless checks (chromium --dump-dom).
  function ready(name) { document.body.dataset.view = name; document.body.dataset.ready = "1"; }
  function fail(message) { add(main, el("p", {className: "error"}, message)); ready("error"); }

  function route() {
    if (!meta) return;
    view += 1;
    delete document.body.dataset.ready;
    main.textContent = "";
    window.scrollTo(0, 0);
    var m = /^#(layer|feature|graph)=(.+)$/.exec(location.hash), arg = m ? decodeURIComponent(m[2]) : "";
    if (!m) overview();
    else if (m[1] === "layer") layerPage(Number(arg));
    else if (m[1] === "feature") featurePage(Number(arg.split("/")[0]), Number(arg.split("/")[1]));
    else graphPage(arg);
  }

  // el("a", {href: "#", className: "x"}, "text", node, [more]): strings become text nodes, never HTML.
  function el(tag, props) {
    var node = document.createElement(tag);
    for (var k in props) if (props[k] != null) node[k] = props[k];
    return add(node, [].slice.call(arguments, 2));
  }
  function add(node, kids) {
    [].concat(kids).forEach(function (k) {
      if (Array.isArray(k)) add(node, k);
      else if (k != null && k !== false) node.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
    });
    return node;
  }
  function svg(tag, attrs, tooltip) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (tooltip != null) node.appendChild(document.createElementNS(SVG, "title")).textContent = tooltip;
    return node;
  }
  function table(id, heads, rows) {
    return el("table", {id: id}, el("thead", {}, el("tr", {}, heads.map(function (h) { return el("th", {}, h); }))),
              el("tbody", {}, rows));
  }
  function nav(links) {
    return el("nav", {}, links.filter(Boolean).map(function (p) { return el("a", {href: p[0], id: p[2]}, p[1]); }));
  }

  // Whitespace that would vanish or break the line is shown as a mark.
  function shown(token) {
    token = String(token == null ? "" : token);
    return token === "" ? "\u2205" : token.replace(/\r/g, "\u240d").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
  }
  function chip(token) { return el("span", {className: "chip", title: JSON.stringify(token)}, shown(token)); }
  function num(x) { return x == null ? "?" : Number(x).toPrecision(3); }
  function pct(x) { return x == null ? "?" : x === 0 ? "0%" : Number(100 * x).toPrecision(3) + "%"; }
  function count(x) { return x == null ? "?" : Number(x).toLocaleString("en-US"); }
  function layerName(l) {
    var model = (meta.layers || [])[l];
    return "layer " + l + (model != null && model !== l ? " (model layer " + model + ")" : "");
  }
  function title(s) { return s.charAt(0).toUpperCase() + s.slice(1); }
  function validLayer(l) { return Number.isInteger(l) && l >= 0 && l < meta.n_layers; }
  function badges(r) {
    return [r.dead && el("span", {className: "badge dead"}, "dead"), r.dense && el("span", {className: "badge dense"}, "dense")];
  }
  function findFeature(records, f) { return records[f] && records[f].feature === f ? records[f] : records.filter(function (r) { return r.feature === f; })[0]; }
  // The tokens a feature fired most on: the marked token of its first top examples.
  function topTokens(r, n) {
    var groups = (r.examples_quantiles || []).filter(function (g) { return (g.examples || []).length; });
    return groups.length ? groups[0].examples.slice(0, n).map(function (ex) { return ex.tokens[ex.train_token_ind]; }) : [];
  }

  function overview() {
    add(main, [
      el("h1", {id: "title"}, meta.title),
      el("p", {id: "summary"}, meta.model + " \u00b7 " + meta.kind + " \u00b7 " + meta.n_layers + " layers \u00d7 " + meta.n_features +
         " features \u00b7 statistics from " + count(meta.tokens) + " held-out tokens in " + count(meta.contexts) +
         " contexts \u00b7 dense: firing on more than " + pct(meta.dense_threshold) + " of tokens"),
      table("summary-table", ["layer", "dead", "dense", "mean frequency", "median frequency"], (meta.per_layer || []).map(function (s, l) {
        return el("tr", {}, el("td", {}, el("a", {href: "#layer=" + l}, layerName(l))), el("td", {className: "num"}, s.dead),
                  el("td", {className: "num"}, s.dense), el("td", {className: "num"}, pct(s.mean_frequency)),
                  el("td", {className: "num"}, pct(s.median_frequency)));
      })),
      el("h2", {}, "Attribution graphs")]);
    var graphs = meta.graphs || [];
    add(main, graphs.length ? el("ul", {id: "graph-list"}, graphs.map(function (g) {
      return el("li", {}, el("a", {href: "#graph=" + encodeURIComponent(g.slug)}, g.prompt), " (" + g.slug + ")");
    })) : el("p", {className: "note"}, "none"));
    ready("overview");
  }

  function layerPage(l) {
    if (!validLayer(l)) return fail("There is no layer " + l + " (" + meta.n_layers + " layers).");
    add(main, [nav([["#", "overview"], l > 0 && ["#layer=" + (l - 1), "\u2190 " + layerName(l - 1)],
                    l + 1 < meta.n_layers && ["#layer=" + (l + 1), layerName(l + 1) + " \u2192"]]),
               el("h1", {id: "layer-title"}, title(layerName(l)))]);
    loadLayer(l, later(function (records) {
      if (!records) return fail("data/layer_" + l + ".js did not load.");
      var pairs = records.map(function (r) {
        return [r, el("tr", {className: (r.dead ? "dead " : "") + (r.dense ? "dense" : "")},
          el("td", {}, el("a", {href: "#feature=" + l + "/" + r.feature}, String(r.feature)), badges(r)),
          el("td", {className: "num"}, pct(r.activation_frequency)), el("td", {className: "num"}, num(r.act_max)),
          el("td", {className: "top-tokens"}, topTokens(r, 3).map(chip)),
          el("td", {className: "top-logits"}, (r.top_logits || []).slice(0, 5).map(chip)))];
      });
      var t = table("layer-table", ["feature", "frequency", "max activation", "top tokens", "top logits"],
                    pairs.map(function (p) { return p[1]; }));
      // A click on a numeric column's header sorts by it, busiest first, then flips.
      ["feature", "activation_frequency", "act_max"].forEach(function (key, i) {
        var th = t.tHead.rows[0].cells[i], sign = 1;
        th.className = "sortable";
        th.title = "sort by " + th.textContent;
        th.onclick = function () {
          sign = -sign;
          pairs.sort(function (a, b) { return sign * (a[0][key] - b[0][key]); });
          pairs.forEach(function (p) { t.tBodies[0].appendChild(p[1]); });
        };
      });
      add(main, t);
      ready("layer");
    }));
  }

  function featurePage(l, f) {
    if (!validLayer(l) || !Number.isInteger(f)) return fail("No such feature: " + location.hash.slice(1) + ".");
    loadLayer(l, later(function (records) {
      if (!records) return fail("data/layer_" + l + ".js did not load.");
      var r = findFeature(records, f);
      if (!r) return fail(title(layerName(l)) + " has no feature " + f + ".");
      add(main, [
        nav([["#", "overview"], ["#layer=" + l, layerName(l), "layer-link"],
             findFeature(records, f - 1) && ["#feature=" + l + "/" + (f - 1), "\u2190 feature " + (f - 1), "prev-feature"],
             findFeature(records, f + 1) && ["#feature=" + l + "/" + (f + 1), "feature " + (f + 1) + " \u2192", "next-feature"]]),
        el("h1", {id: "feature-title"}, title(layerName(l)) + " \u00b7 feature " + f, badges(r)),
        el("p", {id: "feature-stats"}, "index " + r.index + " \u00b7 fires on " + pct(r.activation_frequency) +
           " of tokens \u00b7 activations from " + num(r.act_min) + " to " + num(r.act_max)),
        histogram(r),
        el("h2", {}, "Top logits"), el("div", {id: "top-logits"}, (r.top_logits || []).map(chip)),
        el("h2", {}, "Bottom logits"), el("div", {id: "bottom-logits"}, (r.bottom_logits || []).map(chip)),
        meta.logits_note && el("p", {className: "note"}, "Logits: " + meta.logits_note + "."),
        r.circuits && connections(r.circuits),
        el("div", {id: "examples"}, examples(r))]);
      ready("feature");
    }));
  }

  // Global weights (train/circuits.py): the feature's inputs and outputs by TWERA and by virtual weight,
  // each linked to its page, so a reader can walk the circuit from feature to feature.
  function connections(c) {
    var heads = ["layer", "feature", "TWERA", "ERA", "virtual weight"];
    function rows(list) {
      return (list || []).map(function (e) {
        return el("tr", {}, el("td", {}, layerName(e.layer)),
                  el("td", {}, el("a", {href: "#feature=" + e.layer + "/" + e.feature}, String(e.feature))),
                  el("td", {className: "num"}, num(e.twera)), el("td", {className: "num"}, num(e.era)),
                  el("td", {className: "num"}, num(e.virtual_weight)));
      });
    }
    return el("div", {id: "circuits"}, [
      ["inputs_by_twera", "Inputs by TWERA"], ["outputs_by_twera", "Outputs by TWERA"],
      ["inputs_by_weight", "Inputs by virtual weight"], ["outputs_by_weight", "Outputs by virtual weight"]
    ].map(function (p) {
      return el("section", {className: "connections"}, el("h2", {}, p[1]),
                (c[p[0]] || []).length ? table(p[0].replace(/_/g, "-"), heads, rows(c[p[0]]))
                                       : el("p", {className: "note"}, "none"));
    }), el("p", {className: "note"}, "TWERA: E[a_t a_s] / E[a_t] times the virtual weight (the sum of the source's " +
         "decoders into the residual stream up to the target's layer, dotted with the target's encoder); ERA: " +
         "E[1(a_t > 0) a_s] times it; same-token statistics over the held-out tokens."));
  }

  // Bars over equal bins from act_min to act_max; a bar's tooltip gives its bin and count.
  function histogram(r) {
    var counts = r.histogram || [], W = 600, H = 110, top = Math.max.apply(null, counts.concat([0]));
    var lo = Number(r.act_min) || 0, step = ((Number(r.act_max) || 0) - lo) / Math.max(counts.length, 1), bw = W / Math.max(counts.length, 1);
    var s = svg("svg", {id: "histogram", width: W, height: H + 18, viewBox: "0 0 " + W + " " + (H + 18), role: "img"},
                "histogram of the feature's nonzero activations");
    counts.forEach(function (c, i) {
      if (!(c > 0)) return;
      var h = Math.max(1, H * c / top);  // at least a pixel: rare bins stay visible
      s.appendChild(svg("rect", {class: "bar", x: i * bw, y: H - h, width: Math.max(bw - 1, 0.5), height: h},
                        num(lo + i * step) + " to " + num(lo + (i + 1) * step) + ": " + c));
    });
    s.appendChild(svg("line", {class: "axis", x1: 0, y1: H + 0.5, x2: W, y2: H + 0.5}));
    s.appendChild(svg("text", {x: 0, y: H + 14})).textContent = num(r.act_min);
    s.appendChild(svg("text", {x: W, y: H + 14, "text-anchor": "end"})).textContent = num(r.act_max);
    if (!(top > 0)) s.appendChild(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"})).textContent = "no activations";
    return s;
  }

  function examples(r) {
    var groups = (r.examples_quantiles || []).filter(function (g) { return (g.examples || []).length; });
    if (!groups.length) return el("p", {className: "note"}, r.dead ? "No examples: the feature never fired on the held-out tokens." : "No examples.");
    return groups.map(function (g) {
      return el("section", {className: "quantile"}, el("h3", {}, g.quantile_name),
                g.examples.map(function (ex) { return example(ex, r.act_max); }));
    });
  }

  // One context: tokens shaded by activation / the feature's max, the token it was picked for outlined.
  function example(ex, top) {
    var acts = ex.tokens_acts_list || [];
    top = top > 0 ? top : Math.max.apply(null, acts.concat([0]));
    return el("div", {className: "example" + (ex.is_repeated_datapoint ? " repeated" : ""),
                      title: ex.is_repeated_datapoint ? "repeated: this context also appears in another group" : null},
      (ex.tokens || []).map(function (t, i) {
        var a = Number(acts[i]) || 0;
        var span = el("span", {className: "tok" + (i === ex.train_token_ind ? " max" : ""), title: JSON.stringify(t) + ": " + num(a)}, shown(t));
        if (a > 0 && top > 0) span.style.backgroundColor = "rgba(255, 140, 0, " + Math.min(1, a / top).toFixed(3) + ")";
        return span;
      }));
  }

  function graphPage(slug) {
    var g = (meta.graphs || []).filter(function (x) { return x.slug === slug; })[0];
    if (!g) return fail("There is no graph " + JSON.stringify(slug) + ".");
    var tokens = g.prompt_tokens || [], features = g.top_features || [], logitCells = [];
    var rows = features.map(function (t, i) {
      var logits = el("td", {className: "top-logits"});
      logitCells.push([t, logits]);
      return el("tr", {}, el("td", {className: "num"}, i + 1), el("td", {}, el("a", {href: "#layer=" + t.layer}, layerName(t.layer))),
                el("td", {}, el("a", {href: "#feature=" + t.layer + "/" + t.feature}, String(t.feature))),
                el("td", {}, t.ctx_idx + " ", chip(tokens[t.ctx_idx])), el("td", {className: "num"}, num(t.influence)),
                el("td", {className: "num"}, num(t.activation)), logits);
    });
    add(main, [nav([["#", "overview"]]), el("h1", {id: "graph-title"}, "Graph " + g.slug),
      el("div", {id: "graph-prompt", className: "example"}, tokens.map(function (t, i) {
        return el("span", {className: "tok", title: "position " + i + ": " + JSON.stringify(t)}, shown(t));
      })),
      el("p", {id: "graph-scores"}, "replacement score " + num(g.replacement_score) + " \u00b7 completeness score " + num(g.completeness_score)),
      el("h2", {}, "Top features by influence"),
      el("p", {className: "note"}, "influence: circuit-tracer's cumulative share of the graph's influence held by " +
        "this node and every node above it (smaller: more influential)"),
      table("graph-table", ["#", "layer", "feature", "position", "influence", "activation", "top logits"], rows)]);
    // The top logits live in the layer files: the view is complete once each layer it names has loaded.
    var needed = [];
    features.forEach(function (t) { if (needed.indexOf(t.layer) < 0) needed.push(t.layer); });
    var left = needed.length;
    if (!left) return ready("graph");
    needed.forEach(function (l) {
      loadLayer(l, later(function (records) {
        logitCells.forEach(function (p) {
          if (p[0].layer !== l) return;
          var r = records && findFeature(records, p[0].feature);
          add(p[1], r ? (r.top_logits || []).slice(0, 5).map(chip) : "?");
        });
        if (--left === 0) ready("graph");
      }));
    });
  }
})();
"""


# What the page reads of meta before anything else (the rest is optional: shown when present).
META_KEYS = ("title", "model", "kind", "n_layers", "n_features", "layers", "per_layer")


def _script(call: str, payload) -> bytes:
    """`call(<payload as JSON>);` as a script file. ensure_ascii: pure ASCII, so U+2028/U+2029 (line ends in
    older JavaScript) and the file's encoding cannot matter; NaN and Infinity stay readable (JavaScript globals)."""
    return f"{call}{json.dumps(payload, separators=(',', ':'), ensure_ascii=True)});\n".encode("ascii")


def write_browser(folder: Path, meta: dict, layers: Iterable[tuple[int, list[dict]]]) -> Path:
    """Write the feature browser into `folder` (created if missing): the page, its code and style, one data file
    per (layer, records) of `layers`, written as they come, then data/meta.js. Returns folder/"index.html"."""
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"feature browser: meta lacks {', '.join(missing)} (the page needs {', '.join(META_KEYS)})")
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, text in (("index.html", INDEX_HTML), ("browser.css", BROWSER_CSS), ("browser.js", BROWSER_JS)):
        atomic_write_bytes(folder / name, text.encode("utf-8"))
    for layer, records in layers:
        try:
            layer = operator.index(layer)
        except TypeError:
            raise TypeError(f"feature browser: layer {layer!r} is not an integer") from None
        for record in records:
            if record.get("layer") != layer:
                raise ValueError(f"feature browser: the records of layer {layer} include feature "
                                 f"{record.get('feature')!r} of layer {record.get('layer')!r}")
        atomic_write_bytes(folder / "data" / f"layer_{layer}.js", _script(f"window.cltFeatures.layer({layer},", records))
    # meta.js last: it starts the page, so a new folder whose writing stopped part-way says so rather than half-works.
    atomic_write_bytes(folder / "data" / "meta.js", _script("window.cltFeatures.meta(", meta))
    return folder / "index.html"
