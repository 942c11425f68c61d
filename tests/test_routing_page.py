"""`moe-lm eval --html`: the per-token routing recorded in the evaluation pass (eval.json
"passages"), checked against the router recomputed by hand, and the routing page as a real
headless browser draws it."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from moe_lm.cli import HTML_DEFAULT, optional_html_value
from moe_lm.config import load_config
from moe_lm.data.shards import TokenData
from moe_lm.data.tokenizer import token_texts
from moe_lm.evaluation import evaluate_model, route_text, run_eval
from moe_lm.model.transformer import Transformer
from moe_lm.routing_page import PALETTE, build_page
from moe_lm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "model.seq_len=32", "model.ffn_hidden=32", "model.moe.n_experts=4", "train.batch_size=4",
            "train.warmup_steps=2", "train.eval_batches=3", "train.device=cpu", *extra]


def fresh_model(data_dir: Path, config: str, *extra: str) -> Transformer:
    data = TokenData.open(data_dir)
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / config, tiny(data_dir, f"model.vocab_size={data.vocab_size}", *extra)).model
    return Transformer(cfg).eval()


def moe_lm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
    """tiny softmax top-2 of 4 experts, 2 MoE layers, trained 8 steps."""
    cfg = load_config(CONFIGS / "tiny-moe.yaml", tiny(tiny_data_dir, "model.moe.top_k=2", "train.max_steps=8", "train.lr=1e-2",
                                                       "train.eval_every=8", "train.checkpoint_every=8"))
    return train(cfg, out_dir=tmp_path_factory.mktemp("runs") / "tiny", console=Console(file=io.StringIO()),
                 plots=False)


def router_logits(model: Transformer, ids: list[int]) -> list[torch.Tensor]:
    """Per MoE layer, the router logits (T, E) of one sequence, recomputed from the layer's input
    with the router's weight (softmax_topk, switch and expert_choice: x @ W^T)."""
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0].reshape(-1, inp[0].shape[-1]))))
             for b in model.layers if b.is_moe]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return [x.float() @ m.router.weight.float().T for m, x in seen]


def assert_same_choice(recorded: int, logits: torch.Tensor) -> None:
    """recorded = argmax(logits), unless the two are a float-noise tie."""
    best = int(torch.argmax(logits))
    assert recorded == best or float(logits[best] - logits[recorded]) < 1e-4, (recorded, best, logits)


# ---------------------------------------------------------------------------------------------
# what the evaluation records


def test_token_texts_give_each_character_once_and_join_to_the_text(tiny_data_dir):
    tok = TokenData.open(tiny_data_dir).tokenizer()
    text = "def f(x):\n\treturn 'é ü 中文 😀'  # done"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces  # a vocabulary of 512 splits the emoji: its first bytes give no text yet
    assert token_texts(tok, [0]) == ["<|endoftext|>"]
    cut = [i for i, p in enumerate(pieces) if p == ""][0]  # a window that ends inside a character
    assert token_texts(tok, ids[:cut + 1])[-1].endswith("\ufffd")


def test_passages_are_the_routers_top_2_in_the_evaluation_pass(run, tiny_data_dir):
    report, _ = run_eval(run.run_dir, write=False, device="cpu")
    from moe_lm.loading import load_model

    model = load_model(run.run_dir).model
    val = np.asarray(TokenData.open(tiny_data_dir).split("val"), dtype=np.int64)
    assert len(report.passages) == 3
    again, _ = run_eval(run.run_dir, write=False, device="cpu")
    assert [p.ids for p in again.passages] == [p.ids for p in report.passages]  # a seeded choice
    for p in report.passages:
        assert len(p.ids) == 32 == len(p.text_tokens) and p.source.startswith("val window ")
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(val, 32) == p.ids, axis=1))
        assert len(starts) >= 1  # a real window of the validation split
        assert p.domains  # the tiny corpus is tagged by module
        assert [lr.layer for lr in p.layers] == [0, 1]
        for lr, logits in zip(p.layers, router_logits(model, p.ids)):
            probs = logits.softmax(-1)
            for t in range(32):
                assert len(lr.experts[t]) == 2 and lr.dropped[t] == []  # dropless top-2
                ranked = logits[t].sort(descending=True)
                if set(ranked.indices[:2].tolist()) != set(lr.experts[t]):  # only a float-noise tie may differ
                    assert float(ranked.values[1] - ranked.values[2]) < 1e-4
                    continue
                assert lr.top1[t] == lr.experts[t][0]
                assert_same_choice(lr.top1[t], logits[t])
                renorm = probs[t, lr.experts[t]] / probs[t, lr.experts[t]].sum()
                assert lr.weights[t] == pytest.approx(renorm.tolist(), abs=2e-4)


def test_capacity_drops_are_recorded_per_token(tiny_data_dir):
    """Switch with capacity factor 0.5: each token keeps its argmax expert or has it dropped."""
    model = fresh_model(tiny_data_dir, "switch.yaml", "model.moe.capacity_factor=0.5")
    val = TokenData.open(tiny_data_dir).split("val")
    r = evaluate_model(model, val, seq_len=32, batch_size=4, n_batches=2, seed=1, passages=2)
    assert len(r.passages) == 2 and all(lr.dropped_pct > 0 for lr in r.layers)
    n_dropped = 0
    for p in r.passages:
        for lr in p.layers:
            for t in range(len(p.ids)):
                chosen = lr.experts[t] + lr.dropped[t]
                assert len(chosen) == 1  # top-1: kept or dropped, never both
                assert lr.top1[t] == (lr.experts[t][0] if lr.experts[t] else None)
                n_dropped += len(lr.dropped[t])
    assert n_dropped > 0
    # the user's own text through the same recording: one batch of one row
    ids = val[:20].tolist()
    (p,) = route_text(model, ids, seq_len=32)
    for lr, logits in zip(p.layers, router_logits(model, ids)):
        for t in range(20):
            assert_same_choice((lr.experts[t] + lr.dropped[t])[0], logits[t])
        cap = math.ceil(0.5 * 32 * 1 / 4)  # per sequence, at the training seq_len (32), whatever the forward's length
        assert max(np.bincount([e for ex in lr.experts for e in ex], minlength=4)) <= cap


def test_expert_choice_gives_a_token_zero_to_many_experts(tiny_data_dir):
    model = fresh_model(tiny_data_dir, "expert-choice.yaml")
    ids = TokenData.open(tiny_data_dir).split("val")[100:132].tolist()
    (p,) = route_text(model, ids, seq_len=32)
    for lr, logits in zip(p.layers, router_logits(model, ids)):
        probs = logits.softmax(-1)  # (T, E); each expert takes its top C tokens
        C = math.ceil(32 * 2.0 / 4)
        for e in range(4):
            took = {t for t in range(32) if e in lr.experts[t]}
            assert took == set(torch.topk(probs[:, e], C).indices.tolist())
        counts = [len(x) for x in lr.experts]
        assert sum(counts) == 4 * C and min(counts) >= 0 and max(counts) <= 4
        assert all(d == [] for d in lr.dropped)


# ---------------------------------------------------------------------------------------------
# the page in a browser


class Chips(HTMLParser):
    """The token chips of a dumped DOM, in document order: their attributes."""

    def __init__(self):
        super().__init__()
        self.chips: list[dict] = []
        self.root: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        if tag == "span" and "tok" in (a.get("class") or "").split() and "data-p" in a:
            self.chips.append(a)


def chips_of(dom: str) -> Chips:
    c = Chips()
    c.feed(dom)
    return c


def rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)))


def background(style: str) -> str:
    m = re.search(r"background(?:-color)?:\s*(rgb\([^)]*\))", style or "")
    return m.group(1) if m else ""


def test_page_in_a_browser_shows_each_tokens_expert_and_switches_layers(run, dump_dom):
    proc = moe_lm("eval", str(run.run_dir), "--device", "cpu", "--html")
    assert proc.returncode == 0, proc.stderr
    page = run.run_dir / "routing.html"
    assert "routing.html" in proc.stdout and page.is_file()
    saved = json.loads((run.run_dir / "eval.json").read_text())
    text = page.read_text()
    # self-contained: nothing to fetch
    assert not re.search(r"""(src|href)\s*=|https?://|<link|@import|url\(""", text)
    assert "<title>Routing of tiny-moe at step 8</title>" in text
    passages = saved["passages"]
    n_tokens = sum(len(p["ids"]) for p in passages)
    assert n_tokens == 3 * 32

    from moe_lm.loading import load_model

    model = load_model(run.run_dir).model
    reference = [router_logits(model, p["ids"]) for p in passages]  # per passage, per layer (T, E)

    colours = {}
    for layer_index, fragment in ((0, ""), (0, "#layer=0"), (1, "#layer=1&token=0.3")):
        dom_text = dump_dom(page.as_uri() + fragment)
        dom = chips_of(dom_text)
        assert dom.root.get("data-rendered") == f"layer-{layer_index}"
        assert len(dom.chips) == n_tokens
        got = []
        for chip in dom.chips:
            p, t = int(chip["data-p"]), int(chip["data-t"])
            expected = passages[p]["layers"][layer_index]["top1"][t]
            assert chip["data-expert"] == str(expected)  # what eval.json holds ...
            assert_same_choice(int(chip["data-expert"]), reference[p][layer_index][t])  # ... = the router's top-1
            assert background(chip.get("style")) == rgb(PALETTE[expected])  # drawn in that expert's colour
            got.append(chip["data-expert"])
        colours[fragment] = got
        if "token=" in fragment:  # focusing a chip shows its experts in every layer
            tip = re.search(r'<div id="tip"[^>]*>(.*?)</div>\s*</main>', dom_text, re.S)
            assert tip and "hidden" not in tip.group(0).split(">")[0], dom_text[-3000:]
            assert "token 4 of passage 1" in tip.group(1) and tip.group(1).count("layer ") == 2
    assert colours[""] == colours["#layer=0"]
    layer0 = [x for p in passages for x in p["layers"][0]["top1"]]
    layer1 = [x for p in passages for x in p["layers"][1]["top1"]]
    assert layer0 != layer1  # so the switch is visible ...
    assert colours["#layer=1&token=0.3"] == [str(x) for x in layer1] != colours["#layer=0"]  # ... and the chips follow


def test_expert_choice_and_shared_experts_in_a_browser(tiny_data_dir, tmp_path, dump_dom):
    """A token no expert picked is a neutral chip; shared experts are listed as always on."""
    model = fresh_model(tiny_data_dir, "expert-choice.yaml", "model.moe.n_shared_experts=1",
                        "model.moe.capacity_factor=1.0")
    data = TokenData.open(tiny_data_dir)
    r = evaluate_model(model, data.split("val"), seq_len=32, batch_size=4, n_batches=1, passages=2,
                       pieces=lambda ids: token_texts(data.tokenizer(), ids))
    report = r.to_json() | {"name": "ec", "step": 0, "split": "val", "checkpoint": "-",
                            "moe": {"router": "expert_choice", "n_experts": 4, "top_k": 2,
                                    "n_shared_experts": 1, "capacity_factor": 1.0}}
    none = sum(x is None for p in report["passages"] for x in p["layers"][0]["top1"])
    assert none > 0  # capacity factor 1: some tokens get no expert
    page = tmp_path / "ec.html"
    page.write_text(build_page(report), encoding="utf-8")
    dom_text = dump_dom(page.as_uri())
    chips = chips_of(dom_text).chips
    assert len(chips) == 64
    assert sum(c["data-expert"] == "none" for c in chips) == none
    assert all("none" in c["class"].split() for c in chips if c["data-expert"] == "none")
    assert "shared ×1" in dom_text and "always on" in dom_text


def test_dense_run_gets_a_page_with_a_note(tiny_data_dir):
    data = TokenData.open(tiny_data_dir)
    cfg = load_config(CONFIGS / "tiny-dense.yaml", [f"data.dir={tiny_data_dir}", "model.d_model=32", "model.n_heads=2",
                                                    "model.n_layers=2", "model.seq_len=32", "model.ffn_hidden=32",
                                                    f"model.vocab_size={data.vocab_size}"]).model
    r = evaluate_model(Transformer(cfg), data.split("val"), seq_len=32, batch_size=4, n_batches=1, passages=3)
    assert r.passages == [] and r.layers == []
    page = build_page(r.to_json() | {"name": "dense", "step": 3, "split": "val", "checkpoint": "-"})
    assert "id='dense-note'" in page and "no routing to show" in page
    assert "<select" not in page


# ---------------------------------------------------------------------------------------------
# the command: the user's own text, a chosen path, errors


def test_text_file_is_shown_instead_of_validation_passages(run, tmp_path):
    text = "def main():\n    return 'héllo'  # the user's own text\n" * 3
    (tmp_path / "mine.py").write_text(text, encoding="utf-8")
    page = tmp_path / "page.html"
    proc = moe_lm("eval", str(run.run_dir), "--device", "cpu", "--json", "--text", str(tmp_path / "mine.py"),
                  "--html", str(page), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    joined = "".join(t for p in out["passages"] for t in p["text_tokens"])
    assert joined == "<|endoftext|>" + text  # after EOT, as a document starts; every character once
    assert all(p["source"].startswith("text") for p in out["passages"])
    assert sum(len(p["ids"]) for p in out["passages"]) > 32  # longer than seq_len: cut in pieces
    assert page.is_file() and '"source":"text, tokens 0-31"' in page.read_text()  # the page shows the text
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["passages"] == out["passages"]


def test_bad_text_and_html_options_are_one_line_exit_2(run, tmp_path, cli_here):
    """In this process (the CLI's own entry point; other tests run it as a subprocess): 4 calls."""

    def moe_lm_here(*args: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(args, *cli_here(*args))

    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    assert_one_line_error(moe_lm_here("eval", str(run.run_dir), "--text", str(tmp_path / "nope.txt")), "does not exist")
    assert_one_line_error(moe_lm_here("eval", str(run.run_dir), "--text", str(tmp_path / "empty.txt")), "is empty")
    assert_one_line_error(moe_lm_here("eval", str(run.run_dir), "--prompt", "x", "--text", str(tmp_path / "empty.txt")),
                          "contradict")
    assert_one_line_error(moe_lm_here("eval", str(run.run_dir), "--html", str(tmp_path / "missing" / "r.html")),
                          "does not exist")


def test_html_takes_a_path_only_when_it_names_an_html_file():
    assert optional_html_value(["eval", "runs/x", "--html"]) == ["eval", "runs/x", f"--html={HTML_DEFAULT}"]
    assert optional_html_value(["eval", "--html", "runs/x"]) == ["eval", f"--html={HTML_DEFAULT}", "runs/x"]
    assert optional_html_value(["eval", "runs/x", "--html", "a/p.HTML"]) == ["eval", "runs/x", "--html", "a/p.HTML"]
    assert optional_html_value(["eval", "runs/x", "--html=a/p"]) == ["eval", "runs/x", "--html=a/p"]
