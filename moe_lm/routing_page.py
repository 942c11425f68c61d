"""The routing page: one self-contained HTML file that shows where each token of a few passages went.

    html = build_page(report.to_json())          # eval.json's dict in, an HTML string out
    write_page(report.to_json(), "runs/tiny-moe/routing.html")

Data in, HTML out: the page is drawn from the dict `evaluation.EvalReport.to_json()` gives (the
same one eval.json holds), so it shows exactly the assignments recorded in the evaluation pass.
Everything is inline (CSS, the data as JSON, the script): the file opens from disk with no
network. What it holds:

- each passage (eval.json "passages") as token chips coloured by the token's top-1 expert in the
  chosen layer (a <select>; `#layer=N` in the URL picks layer N on load, `#layer=N&token=P.T` also
  focuses token T of passage P); hovering or focusing a
  chip (Tab) shows its experts and gate weights in every layer and what a capacity limit dropped;
  a chip with no expert (expert choice, or every choice dropped) is grey and dashed;
- per layer a legend: each expert's colour and number, load share, most frequent tokens, and the
  domains it takes most of (when the data has domain tags), plus a domain x expert table;
- the layer x expert load heatmap and the routing figures of the text report.

The chips' colours and `data-expert` attributes are set by the page's script from the embedded
data (not written by Python), so a browser test reads what the page really drew. A dense run
gets a page that says there is no routing to show.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from .files import write_atomic
from .stats import STARVED

# 64 categorical colours: Tableau 10 (its first 9, grey left out) extended by a greedy
# farthest-point choice in CIELAB (every pair at least ΔE 23 apart; none grey, the no-expert
# colour). Experts past 64 reuse colours; their number is on the chip (checkbox) and on hover.
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#0000ff", "#ff1eff", "#00ff00", "#00ffc3", "#005a3c", "#690fb4", "#f0b478",
    "#ff0078", "#69690f", "#b4e196", "#0078ff", "#960f4b", "#a5ff5a", "#ff8787", "#964b00",
    "#c300a5", "#e1c3ff", "#00f078", "#d269ff", "#00a578", "#ffb400", "#004bff", "#5a3c69",
    "#006978", "#005a00", "#a51eff", "#879669", "#004ba5", "#b4870f", "#78c3ff", "#d2f000",
    "#87f0d2", "#ff0000", "#b47896", "#00c300", "#871e78", "#ffe178", "#ffe100", "#5a2d96",
    "#962d2d", "#f0784b", "#ffb4c3", "#96a5ff", "#87a53c", "#d22d87", "#78b400", "#96ff96",
    "#003cc3", "#4b9687", "#a5783c", "#f0e1a5", "#ff69e1", "#e13c5a", "#e196ff", "#9696c3",
]


def _luminance(hex_colour: str) -> float:
    """WCAG relative luminance of #rrggbb, 0 (black) .. 1 (white)."""
    c = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with `background` (#rrggbb)."""
    lum = _luminance(background)
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#ffffff"


def expert_colours(n_experts: int) -> list[tuple[str, str]]:
    """(background, text) colours of experts 0 .. n_experts-1 (#rrggbb strings); PALETTE repeats
    past 64 experts."""
    return [(PALETTE[e % len(PALETTE)], text_colour(PALETTE[e % len(PALETTE)])) for e in range(n_experts)]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _shade(frac: float) -> tuple[str, str]:
    """White -> dark blue for frac in [0, 1], with a readable text colour."""
    f = min(max(frac, 0.0), 1.0)
    r, g, b = (round(255 + (t - 255) * f) for t in (8, 81, 156))
    bg = f"#{r:02x}{g:02x}{b:02x}"
    return bg, text_colour(bg)


def _heatmap(report: dict) -> str:
    layers = report["layers"]
    E = len(layers[0]["load_share"])
    fair = 1.0 / E
    head = "".join(f"<th scope='col'>{e}</th>" for e in range(E))
    rows = []
    for lr in layers:
        cells = []
        for e, share in enumerate(lr["load_share"]):
            bg, fg = _shade(share / (2 * fair))
            label = f"{100 * share:.1f}" if E <= 16 else ""
            cells.append(f"<td style='background:{bg};color:{fg}' title='layer {lr['layer']}, expert {e}: "
                         f"{100 * share:.2f}% of the assignments'>{label}</td>")
        rows.append(f"<tr><th scope='row'>layer {lr['layer']}</th>{''.join(cells)}</tr>")
    return (f"<table class='heat'><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p class='cap'>share of each layer's assignments per expert, % (white = none, darkest = twice the "
            f"fair share of {100 * fair:.1f}% or more)</p>")


def _figures(report: dict) -> str:
    layers = report["layers"]
    E = len(layers[0]["load_share"])
    rows = []
    for lr in layers:
        flags = [f"dead {e}" for e in lr["dead"]] + [f"starved {e}" for e in lr["starved"] if e not in lr["dead"]]
        rows.append(f"<tr><th scope='row'>{lr['layer']}</th><td>{lr['cv_importance']:.3f}</td><td>{lr['cv_load']:.3f}</td>"
                    f"<td>{lr['max_mean']:.2f}</td><td>{lr['dropped_pct']:.2f}</td><td>{lr['entropy']:.3f}</td>"
                    f"<td>{_e(', '.join(flags) or '-')}</td></tr>")
    return ("<table class='figures'><thead><tr><th scope='col'>layer</th><th scope='col'>CV imp</th>"
            "<th scope='col'>CV load</th><th scope='col'>max/mean</th><th scope='col'>drop %</th>"
            "<th scope='col'>entropy</th><th scope='col'>dead / starved</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            "<p class='cap'>CV of importance and load and max/mean load as in Shazeer et al. 2017, Table 6; drop % = "
            "assignments dropped by a capacity limit (expert choice: tokens no expert took); entropy of the router "
            f"in nats (uniform = {math.log(E):.2f}); starved = under {STARVED:g} x the fair share</p>")


def _describe_moe(moe: dict) -> str:
    E, k, router = moe["n_experts"], moe["top_k"], moe["router"]
    what = (f"expert choice over {E} experts (each expert picks its tokens: a token gets 0..{E})"
            if router == "expert_choice" else f"{router}, top-{k} of {E} experts")
    if moe.get("n_shared_experts"):
        what += f" + {moe['n_shared_experts']} shared experts (every token, always on)"
    if moe.get("capacity_factor") is not None and router != "expert_choice":
        what += f", capacity factor {moe['capacity_factor']:g}"
    return what


def build_page(report: dict) -> str:
    """The routing page of an evaluation, as one self-contained HTML document (a str).

    report: `EvalReport.to_json()` (eval.json's content): needs name, step, split, ppl, loss,
    n_tokens, windows, checkpoint, moe, layers and passages. A dense report (moe None or no
    layers) gives a page with a note instead of the routing views. Raises KeyError when a needed
    key is missing.
    """
    name = report.get("name") or "run"
    step = report.get("step")
    title = f"Routing of {name} at step {step}" if step is not None else f"Routing of {name}"
    summary = (f"{_e(report['split'])} perplexity <b>{report['ppl']:.2f}</b> (loss {report['loss']:.4f} nats/token) "
               f"over {report['n_tokens']:,} tokens ({_e(report['windows'])}); checkpoint {_e(report['checkpoint'])}")
    dense = not report.get("moe") or not report.get("layers")
    if dense:
        body = (f"<p class='note' id='dense-note'>{_e(name)} is a dense model: every token goes through the same "
                "feed-forward network, so there is no routing to show. Train a config with <code>model.moe</code> "
                "(e.g. configs/tiny-moe.yaml) to see where the tokens go.</p>")
        data: dict = {"dense": True}
    else:
        moe = report["moe"]
        E = moe["n_experts"]
        options = "".join(f"<option value='{lr['layer']}'>layer {lr['layer']}</option>" for lr in report["layers"])
        body = f"""
<p class="sub">{_e(_describe_moe(moe))}</p>
<div class="grid">
<section id="passages-section" aria-labelledby="passages-h">
  <div class="controls">
    <h2 id="passages-h">Passages</h2>
    <label>colour by the top-1 expert of <select id="layer">{options}</select></label>
    <label><input type="checkbox" id="numbers"> expert numbers on the chips</label>
  </div>
  <p class="hint">Each chip is one token, coloured by the expert with the largest gate weight in this layer.
  Hover a chip, or Tab to it, for its experts and gate weights in every layer.
  <span class="sample none-sample">grey, dashed</span> = no expert processed it;
  <span class="sample dropped-sample">red underline</span> = a choice dropped by the capacity limit.</p>
  <div id="passages" aria-live="polite"></div>
</section>
<aside id="legend-section" aria-labelledby="legend-h">
  <h2 id="legend-h">Experts of layer <span id="legend-layer"></span></h2>
  <table id="legend"><thead><tr><th scope="col">expert</th><th scope="col">load</th>
  <th scope="col">most frequent tokens <span class="muted" id="legend-dom-h">/ the domains it takes most of</span></th></tr></thead>
  <tbody></tbody></table>
</aside>
</div>
<section id="domains-section" aria-labelledby="domains-h">
  <h2 id="domains-h">Domains in layer <span id="domains-layer"></span></h2>
  <div id="domains"></div>
</section>
<section aria-labelledby="heat-h"><h2 id="heat-h">Load per layer and expert</h2>{_heatmap(report)}</section>
<section aria-labelledby="fig-h"><h2 id="fig-h">Routing figures</h2>{_figures(report)}</section>
<div id="tip" role="tooltip" hidden></div>"""
        data = {
            "dense": False, "moe": moe, "layers": report["layers"], "passages": report.get("passages", []),
            "colours": [list(c) for c in expert_colours(E)],
        }
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert inside <script>
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{_e(title)}</h1><p class="sub">{summary}</p></header>
<main>{body}</main>
<script id="routing-data" type="application/json">{blob}</script>
<script>{_JS}</script>
</body>
</html>
"""


def write_page(report: dict, path: Path | str) -> Path:
    """Write `build_page(report)` to `path` atomically (UTF-8); creates nothing but the file.

    Returns the path. OSError (e.g. a folder that does not exist) passes through; callers check
    the path first (`evaluation.check_html_path`).
    """
    path = Path(path)
    return write_atomic(path, build_page(report))


_CSS = """
:root { --fg: #1b1b1b; --muted: #5b5b5b; --line: #d0d0d0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fafafa; }
header { padding: 10px 20px 4px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 15px; margin: 14px 0 6px; }
main { padding: 0 20px 30px; }
.sub { margin: 2px 0 6px; color: var(--muted); }
.note { font-size: 16px; padding: 16px; background: #fff8e1; border: 1px solid #e0c060; border-radius: 6px; }
.grid { display: grid; grid-template-columns: minmax(0, 1fr) minmax(360px, 430px); gap: 18px; align-items: start; }
.controls { display: flex; gap: 18px; align-items: baseline; flex-wrap: wrap; }
.controls h2 { margin-right: 6px; }
select { font: inherit; padding: 1px 4px; }
.hint { margin: 2px 0 8px; color: var(--muted); font-size: 13px; }
.passage { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px 8px; margin: 0 0 10px; }
.passage h3 { font-size: 12px; font-weight: 600; color: var(--muted); margin: 0 0 4px; }
.text { font: 12.5px/1.75 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: normal; overflow-wrap: anywhere; }
.tok { white-space: pre-wrap; border-radius: 3px; padding: 1px 0; margin: 0 1px 0 0; outline-offset: 1px; }
.tok:focus { outline: 2px solid #000; }
.tok:hover { outline: 2px solid #555; }
.tok.none { background: #ececec; color: #333; border: 1px dashed #888; }
.tok.dropped { box-shadow: inset 0 -3px 0 #d00000; }
.tok.partial { opacity: .75; }
.tok.special { font-style: italic; }
.sample { padding: 0 3px; font: 12px monospace; }
.none-sample { background: #ececec; border: 1px dashed #888; }
.dropped-sample { background: #ddd; box-shadow: inset 0 -3px 0 #d00000; }
body.numbers .tok::after { content: attr(data-n); font-size: 9px; vertical-align: super; margin-left: 1px; }
#legend-section { position: sticky; top: 6px; max-height: calc(100vh - 12px); overflow: auto; background: #fff;
                  border: 1px solid var(--line); border-radius: 6px; padding: 0 10px 8px; }
table { border-collapse: collapse; }
#legend { width: 100%; font-size: 12.5px; }
#legend td, #legend th { padding: 2px 4px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
.sw { display: inline-block; min-width: 26px; text-align: center; border-radius: 3px; font-weight: 600; padding: 0 3px; }
.bar { display: inline-block; height: 8px; background: #08519c; vertical-align: middle; margin-right: 4px; }
.toks code { background: #f1f1f1; border-radius: 2px; padding: 0 2px; margin-right: 3px; white-space: pre; font-size: 11.5px; }
.heat td, .heat th, .figures td, .figures th, .dom td, .dom th { padding: 2px 6px; border: 1px solid #e4e4e4;
  text-align: right; font-size: 12px; }
.heat td { min-width: 18px; }
.muted { color: var(--muted); font-weight: normal; }
.doms { color: var(--muted); font-size: 11.5px; }
.cap { color: var(--muted); font-size: 12px; margin: 4px 0; }
#tip { position: fixed; z-index: 10; max-width: 600px; background: #fff; border: 1px solid #888; border-radius: 6px;
       box-shadow: 0 3px 12px rgba(0,0,0,.25); padding: 6px 8px; font-size: 12.5px; pointer-events: none; }
#tip table td { padding: 1px 6px 1px 0; vertical-align: top; }
#tip table td:first-child { white-space: nowrap; }
#tip .cur { font-weight: 700; }
#tip .drop { color: #b00000; }
#tip .tokname { font: 13px monospace; background: #f1f1f1; padding: 0 3px; white-space: pre; }
"""

_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("routing-data").textContent);
  if (DATA.dense) { document.documentElement.setAttribute("data-rendered", "dense"); return; }
  var COLOURS = DATA.colours, MOE = DATA.moe, LAYERS = DATA.layers, PASSAGES = DATA.passages;
  var EOT = "<|endoftext|>";
  var select = document.getElementById("layer");
  var tip = document.getElementById("tip");
  var chips = [];  // [element, passage index, token index]

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function shown(t) {  // what a chip displays: newlines and tabs made visible, breaks kept
    if (t === "") { return "\u2026"; }
    return t.replace(/\t/g, "\u21e5\t").replace(/\n/g, "\u21b5\n");
  }
  function visible(t) { return t === "" ? "(part of a character)" : t.replace(/\n/g, "\\n").replace(/\t/g, "\\t"); }
  function layerIndex(layer) {
    for (var i = 0; i < LAYERS.length; i++) { if (String(LAYERS[i].layer) === String(layer)) { return i; } }
    return -1;
  }
  function swatch(e) {
    var c = COLOURS[e];
    return el("span", {"class": "sw", "style": "background:" + c[0] + ";color:" + c[1]}, String(e));
  }

  // the passages: one chip per token, made once; render() colours them for a layer
  var box = document.getElementById("passages");
  if (!PASSAGES.length) { box.appendChild(el("p", {"class": "hint"}, "No passages were recorded.")); }
  PASSAGES.forEach(function (p, pi) {
    var sec = el("div", {"class": "passage"});
    var head = "passage " + (pi + 1) + " \u00b7 " + p.source + " \u00b7 " + p.ids.length + " tokens";
    if (p.domains && p.domains.length) { head += " \u00b7 domain" + (p.domains.length > 1 ? "s " : " ") + p.domains.join(", "); }
    sec.appendChild(el("h3", {}, head));
    var text = el("div", {"class": "text"});
    p.text_tokens.forEach(function (t, ti) {
      var c = el("span", {"class": "tok", "tabindex": "0", "data-p": String(pi), "data-t": String(ti),
                          "aria-describedby": "tip"}, t === EOT ? EOT : shown(t));
      if (t === "") { c.classList.add("partial"); }
      if (t === EOT) { c.classList.add("special"); }
      text.appendChild(c);
      if (t === EOT) { text.appendChild(el("br", {})); }
      chips.push([c, pi, ti]);
    });
    sec.appendChild(text);
    box.appendChild(sec);
  });

  function render(layer) {
    var li = layerIndex(layer);
    if (li < 0) { li = 0; }
    var L = LAYERS[li];
    chips.forEach(function (x) {
      var c = x[0], pl = PASSAGES[x[1]].layers[li];
      var e = pl.top1[x[2]];
      c.classList.toggle("dropped", pl.dropped[x[2]].length > 0);
      if (e === null || e === undefined) {
        c.classList.add("none");
        c.style.background = ""; c.style.color = "";
        c.setAttribute("data-expert", "none");
        c.setAttribute("data-n", "\u2205");
      } else {
        c.classList.remove("none");
        c.style.background = COLOURS[e][0]; c.style.color = COLOURS[e][1];
        c.setAttribute("data-expert", String(e));
        c.setAttribute("data-n", String(e));
      }
      c.setAttribute("aria-label", "token " + visible(PASSAGES[x[1]].text_tokens[x[2]]) + ", " +
                     (e === null ? "no expert" : "expert " + e) + " in layer " + L.layer);
    });
    document.getElementById("passages").setAttribute("data-layer", String(L.layer));
    legend(L);
    domains(L);
    document.documentElement.setAttribute("data-rendered", "layer-" + L.layer);
  }

  function legend(L) {
    document.getElementById("legend-layer").textContent = String(L.layer);
    var body = document.querySelector("#legend tbody");
    body.textContent = "";
    var hasDom = Object.keys(L.domain_share || {}).length > 0;
    document.getElementById("legend-dom-h").style.display = hasDom ? "" : "none";
    var maxShare = Math.max.apply(null, L.load_share.concat([1e-9]));
    var total = 0; for (var d in (L.domain_assignments || {})) { total += L.domain_assignments[d]; }
    L.load_share.forEach(function (share, e) {
      var tr = el("tr", {});
      var a = el("td", {}); a.appendChild(swatch(e)); tr.appendChild(a);
      var b = el("td", {"style": "white-space:nowrap"});
      b.appendChild(el("span", {"class": "bar", "style": "width:" + Math.round(50 * share / maxShare) + "px"}));
      b.appendChild(document.createTextNode((100 * share).toFixed(1) + "%"));
      tr.appendChild(b);
      var t = el("td", {"class": "toks"});
      (L.top_tokens[e] || []).slice(0, 6).forEach(function (tc) {
        t.appendChild(el("code", {"title": tc[1] + " times"}, visible(tc[0]).replace(/ /g, "\u00b7")));
      });
      if (hasDom) {  // the (big) domains whose assignments this expert takes the largest share of
        var rows = [];
        for (var name in L.domain_share) {
          if (L.domain_assignments[name] >= 0.01 * total) { rows.push([name, L.domain_share[name][e]]); }
        }
        rows.sort(function (x, y) { return y[1] - x[1]; });
        t.appendChild(el("div", {"class": "doms"}, rows.slice(0, 3).map(function (r) {
          return r[0] + " " + Math.round(100 * r[1]) + "%"; }).join(" \u00b7 ")));
      }
      tr.appendChild(t);
      body.appendChild(tr);
    });
    if (MOE.n_shared_experts) {
      var tr = el("tr", {});
      tr.appendChild(el("td", {}, "shared \u00d7" + MOE.n_shared_experts));
      tr.appendChild(el("td", {"colspan": "2"}, "always on: every token goes through the shared experts as well"));
      body.appendChild(tr);
    }
  }

  function domains(L) {
    document.getElementById("domains-layer").textContent = String(L.layer);
    var box = document.getElementById("domains");
    box.textContent = "";
    var names = Object.keys(L.domain_share || {});
    var sec = document.getElementById("domains-section");
    if (!names.length) { sec.style.display = "none"; return; }
    sec.style.display = "";
    var E = L.load_share.length, total = 0;
    names.forEach(function (n) { total += L.domain_assignments[n]; });
    var big = names.filter(function (n) { return L.domain_assignments[n] >= 0.01 * total; });
    big.sort(function (x, y) { return Math.max.apply(null, L.domain_share[y]) - Math.max.apply(null, L.domain_share[x]); });
    big = big.slice(0, 12);
    var table = el("table", {"class": "dom"});
    var head = el("tr", {}); head.appendChild(el("th", {"scope": "col"}, "domain"));
    for (var e = 0; e < E; e++) { var th = el("th", {"scope": "col"}); th.appendChild(swatch(e)); head.appendChild(th); }
    var thead = el("thead", {}); thead.appendChild(head); table.appendChild(thead);
    var tbody = el("tbody", {});
    big.forEach(function (n) {
      var tr = el("tr", {}); tr.appendChild(el("th", {"scope": "row"}, n));
      L.domain_share[n].forEach(function (v) {
        var f = Math.min(v * E / 2, 1);  // darkest = twice the uniform share
        var r = Math.round(255 + (8 - 255) * f), g = Math.round(255 + (81 - 255) * f), b = Math.round(255 + (156 - 255) * f);
        tr.appendChild(el("td", {"style": "background:rgb(" + r + "," + g + "," + b + ");color:" + (f > 0.55 ? "#fff" : "#000")},
                          E <= 16 ? Math.round(100 * v) + "" : ""));
      });
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
    box.appendChild(table);
    box.appendChild(el("p", {"class": "cap"}, "share of each domain's assignments per expert, % (the " + big.length +
      " most specialised of the domains with \u2265 1% of the tokens; uniform = " + (100 / E).toFixed(1) + "%)"));
  }

  function showTip(c) {
    var pi = +c.getAttribute("data-p"), ti = +c.getAttribute("data-t");
    var p = PASSAGES[pi], cur = layerIndex(select.value);
    tip.textContent = "";
    var h = el("div", {});
    h.appendChild(el("span", {"class": "tokname"}, visible(p.text_tokens[ti])));
    h.appendChild(document.createTextNode(" token " + (ti + 1) + " of passage " + (pi + 1) + " (id " + p.ids[ti] + ")"));
    tip.appendChild(h);
    var table = el("table", {});
    p.layers.forEach(function (pl, li) {
      var tr = el("tr", li === cur ? {"class": "cur"} : {});
      tr.appendChild(el("td", {}, "layer " + pl.layer));
      var td = el("td", {});
      var ex = pl.experts[ti], w = pl.weights[ti];
      if (!ex.length) {
        td.appendChild(document.createTextNode(MOE.router === "expert_choice" ? "no expert picked it" : "no expert (every choice dropped)"));
      }
      ex.forEach(function (e, k) {
        td.appendChild(swatch(e));
        td.appendChild(document.createTextNode(" " + w[k].toFixed(3) + "  "));
      });
      if (pl.dropped[ti].length) {
        td.appendChild(el("span", {"class": "drop"}, " dropped (capacity): " + pl.dropped[ti].join(", ")));
      }
      tr.appendChild(td);
      table.appendChild(tr);
    });
    tip.appendChild(table);
    var foot = "expert number and gate weight, largest first";
    if (MOE.n_shared_experts) { foot += "; + " + MOE.n_shared_experts + " shared experts, always on"; }
    tip.appendChild(el("div", {"class": "hint"}, foot));
    tip.hidden = false;
    var r = c.getBoundingClientRect(), tw = tip.offsetWidth, th = tip.offsetHeight;
    var x = Math.min(Math.max(4, r.left), window.innerWidth - tw - 4);
    var y = r.bottom + 6 + th > window.innerHeight ? r.top - th - 6 : r.bottom + 6;
    tip.style.left = x + "px"; tip.style.top = Math.max(4, y) + "px";
  }
  function hideTip() { tip.hidden = true; }
  box.addEventListener("mouseover", function (ev) { if (ev.target.classList.contains("tok")) { showTip(ev.target); } });
  box.addEventListener("mouseout", function (ev) { if (ev.target.classList.contains("tok")) { hideTip(); } });
  box.addEventListener("focusin", function (ev) { if (ev.target.classList.contains("tok")) { showTip(ev.target); } });
  box.addEventListener("focusout", hideTip);
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") { hideTip(); } });

  select.addEventListener("change", function () {
    render(select.value);
    try { history.replaceState(null, "", "#layer=" + select.value); } catch (err) { /* file: URLs may refuse */ }
  });
  document.getElementById("numbers").addEventListener("change", function (ev) {
    document.body.classList.toggle("numbers", ev.target.checked);
  });
  // #layer=N picks the layer on load, through the selector's own change handler;
  // #...&token=P.T focuses token T of passage P (both from 0), as Tab would
  var hash = location.hash;
  var m = /layer=(\d+)/.exec(hash), f = /token=(\d+)\.(\d+)/.exec(hash);
  if (m && layerIndex(m[1]) >= 0) { select.value = m[1]; }
  select.dispatchEvent(new Event("change"));
  if (f) {
    var target = document.querySelector('.tok[data-p="' + f[1] + '"][data-t="' + f[2] + '"]');
    if (target) { target.focus({preventScroll: true}); showTip(target); }
  }
})();
"""
