"""`moe-lm export --format hf`: transformers' own Llama / Mixtral / Qwen2-MoE code, loading the
exported folder offline, computes the same logits as this tool (1e-4, float32) and the same greedy
continuation; configs that no architecture matches exactly are refused; the export reads back."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from moe_lm.config import ModelConfig, MoEConfig, load_config
from moe_lm.errors import CheckpointError, ExportError
from moe_lm.export import export_hf, write_hf_folder
from moe_lm.hf_format import hf_target
from moe_lm.generate import generate_ids
from moe_lm.loading import load_model
from moe_lm.model.transformer import Transformer
from moe_lm.training.trainer import train

transformers = pytest.importorskip("transformers")
# a Qwen2-MoE export without shared experts has a zero-width shared expert (it adds exactly 0)
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and are not slowed by other processes' threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# name -> (shipped config, overrides, the architecture transformers must load it as)
RUNS = {
    "mixtral": ("tiny-moe.yaml", ["model.moe.n_experts=4", "model.moe.top_k=2"], "MixtralForCausalLM"),
    # switch top-1 (weight p, not renormalised) + an always-on shared expert + MoE every 2nd block
    "qwen2_moe": ("tiny-moe.yaml", ["model.moe.n_experts=4", "model.moe.top_k=1", "model.moe.router=switch",
                                    "model.moe.n_shared_experts=1", "model.moe.every=2",
                                    "model.tie_embeddings=true"], "Qwen2MoeForCausalLM"),
    "dense": ("tiny-dense.yaml", [], "LlamaForCausalLM"),
}


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.seq_len=32",
            "model.ffn_hidden=32", "train.batch_size=4", "train.warmup_steps=1", "train.lr=1e-2",
            "train.max_steps=3", "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=3",
            "train.device=cpu", *extra]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def exports(tiny_data_dir, tmp_path_factory) -> dict[str, Path]:
    """Three runs trained for 3 steps and exported: name -> export folder."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (config, extra, _) in RUNS.items():
        cfg = load_config(ROOT / "configs" / config, tiny(tiny_data_dir, *extra))
        run = train(cfg, out_dir=root / f"run-{name}", plots=False, console=quiet())
        out[name] = export_hf(run.run_dir, root / name).out_dir
    return out


def val_batch(tiny_data_dir: Path, batch: int = 4, seq: int = 32) -> torch.Tensor:
    from moe_lm.data.shards import TokenData

    val = torch.from_numpy(TokenData.open(tiny_data_dir).split("val")[: batch * seq].astype("int64"))
    return val.view(batch, seq)


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


# ---------------------------------------------------------------------------------------------
# transformers computes what we compute


@pytest.mark.parametrize("name", list(RUNS))
def test_transformers_loads_the_export_as_its_architecture_and_the_logits_match(name, exports, tiny_data_dir):
    hf = hf_model(exports[name])
    assert type(hf).__name__ == RUNS[name][2] and hf.dtype == torch.float32
    ours = load_model(Path(json.loads((exports[name] / "moe_lm.json").read_text())["exported_from"])).model
    idx = val_batch(tiny_data_dir)
    with torch.no_grad():
        a, b = ours(idx).logits, hf(idx).logits
    diff = (a - b).abs().max().item()
    print(f"{name}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", list(RUNS))
def test_greedy_generation_of_32_tokens_with_our_kv_cache_equals_transformers_generate(name, exports, tiny_data_dir):
    hf = hf_model(exports[name])
    ours = load_model(exports[name]).model
    prompt = val_batch(tiny_data_dir, 1, 8)
    ids = list(generate_ids(ours, prompt[0].tolist(), max_new_tokens=32, temperature=0, eot_id=None))
    gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc)[0, 8:].tolist()
    assert len(ref) == 32 and ids == ref


def test_autotokenizer_reads_the_same_tokenizer_and_end_of_text(exports, tiny_data_dir):
    from moe_lm.data.tokenizer import EOT, load_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(exports["mixtral"], local_files_only=True)
    ours = load_tokenizer(tiny_data_dir / "tokenizer.json")
    eot = ours.token_to_id(EOT)
    text = "def f(x):\n    return x  # naïve ✓ 日本\n\n\tend"
    ids = tok(text)["input_ids"]
    # the data folder's ids of the text, after the document start (<|endoftext|>) moe-lm generate puts first
    assert ids == [eot] + ours.encode(text, add_special_tokens=False).ids
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.decode(ids[1:]) == text and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == tok.bos_token == EOT and tok.eos_token_id == tok.bos_token_id == eot
    gen = json.loads((exports["mixtral"] / "generation_config.json").read_text())
    config = json.loads((exports["mixtral"] / "config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == config["bos_token_id"] == config["eos_token_id"] == eot


@pytest.mark.parametrize("name", list(RUNS))
def test_plain_transformers_calls_give_what_moe_lm_generate_gives(name, exports, tiny_data_dir, monkeypatch, capsys):
    """The calls a user writes from docs/EXPORT.md, with nothing added by hand, against
    `moe-lm generate --temperature 0` on the same export: the same tokens and the same text."""
    from moe_lm.cli import run
    from moe_lm.data.tokenizer import EOT, load_tokenizer

    folder, prompt, n = exports[name], "def main(", 24
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=n)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True)

    monkeypatch.setattr(sys, "argv", ["moe-lm", "generate", str(folder), "-p", prompt, "-t", "0", "-n", str(n),
                                      "--device", "cpu"])
    run()
    assert capsys.readouterr().out == prompt + text + "\n"

    # and token for token: the ids moe-lm feeds its model are <|endoftext|> + the prompt's
    data_tok = load_tokenizer(tiny_data_dir / "tokenizer.json")
    eot = data_tok.token_to_id(EOT)
    assert inputs["input_ids"][0].tolist() == [eot] + data_tok.encode(prompt, add_special_tokens=False).ids
    ours = list(generate_ids(load_model(folder).model, inputs["input_ids"][0].tolist(), n, temperature=0, eot_id=eot))
    assert new == ours + ([eot] if len(ours) < n else [])  # transformers keeps the end-of-text it stopped at


def test_load_model_reads_an_export_back_to_the_same_function(exports, tiny_data_dir):
    for name, folder in exports.items():
        back = load_model(folder)
        src = load_model(Path(back.state["exported_from"]))
        assert back.cfg == src.cfg and back.step == src.step == 3 and back.run_dir is None
        idx = val_batch(tiny_data_dir)
        with torch.no_grad():
            assert torch.equal(back.model(idx).logits, src.model(idx).logits), name
        text = "class A:\n    pass  # ✓"
        assert back.tokenizer().encode(text, add_special_tokens=False).ids == \
            src.tokenizer().encode(text, add_special_tokens=False).ids


def test_eval_of_an_export_accepts_the_data_it_was_trained_on(exports, tiny_data_dir):
    # the export's tokenizer.json differs from the data folder's only by the post-processor that puts
    # <|endoftext|> first: the same ids for every text, so eval takes the data folder
    from moe_lm.evaluation import run_eval

    folder = exports["mixtral"]
    ours, _ = run_eval(folder, split="val", n_batches=1, data_dir=tiny_data_dir, device="cpu", write=False)
    src, _ = run_eval(Path(json.loads((folder / "moe_lm.json").read_text())["exported_from"]), split="val",
                      n_batches=1, data_dir=tiny_data_dir, device="cpu", write=False)
    assert ours.loss == src.loss and ours.n_tokens == src.n_tokens > 0


def test_a_changed_export_is_a_checkpoint_error_not_a_wrong_model(exports, tmp_path):
    import shutil

    folder = tmp_path / "x"
    shutil.copytree(exports["dense"], folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------
# every router / layout that maps, on random weights with decisive routing (no training)


def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "router" in name:
                p.normal_(std=1.0)  # routing far from ties: a rounding difference cannot flip it
    return model


CASES = {
    "softmax top-2 -> Mixtral": (MoEConfig(n_experts=4, top_k=2), "MixtralForCausalLM"),
    "noisy top-2 (noise off) -> Mixtral": (MoEConfig(n_experts=4, top_k=2, router="noisy_topk",
                                                     balance_loss="shazeer"), "MixtralForCausalLM"),
    "softmax top-1 keeps p -> Qwen2-MoE": (MoEConfig(n_experts=4, top_k=1), "Qwen2MoeForCausalLM"),
    "2 shared experts + top-2 -> Qwen2-MoE": (MoEConfig(n_experts=4, top_k=2, n_shared_experts=2),
                                               "Qwen2MoeForCausalLM"),
    "MoE every 2nd block -> Qwen2-MoE": (MoEConfig(n_experts=4, top_k=2, every=2), "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_exportable_router_equals_transformers_on_random_weights(case, tiny_data_dir, tmp_path):
    from moe_lm.config import Config

    moe, arch = CASES[case]
    cfg = Config(model=ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, ffn_hidden=16, seq_len=16,
                                   rope_theta=500.0, moe=moe))
    model = random_model(cfg.model)
    write_hf_folder(model, cfg, tiny_data_dir / "tokenizer.json", tmp_path / "hf")
    hf = hf_model(tmp_path / "hf")
    assert type(hf).__name__ == arch
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(load_model(tmp_path / "hf").model(idx).logits, model(idx).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# refused: no architecture computes these exactly


REFUSED = {
    "relu experts": (dict(activation="relu"), MoEConfig(), "model.activation = relu"),
    "gelu dense": (dict(activation="gelu"), None, "model.activation = gelu"),
    "expert_choice": ({}, MoEConfig(router="expert_choice", capacity_factor=2.0), "expert_choice"),
    "sigmoid_bias": ({}, MoEConfig(router="sigmoid_bias"), "sigmoid_bias"),
    "capacity limit": ({}, MoEConfig(router="switch", top_k=1, capacity_factor=1.25), "capacity_factor = 1.25"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_config_no_architecture_matches_is_refused_naming_the_setting(case):
    kw, moe, fragment = REFUSED[case]
    with pytest.raises(ExportError, match="no transformers architecture") as e:
        hf_target(ModelConfig(vocab_size=512, moe=moe, **kw))
    assert fragment in str(e.value)


def test_exporting_a_refused_run_writes_nothing(tiny_data_dir, tmp_path):
    cfg = load_config(ROOT / "configs" / "shazeer-2017.yaml",
                      tiny(tiny_data_dir, "train.max_steps=1", "train.eval_every=1", "train.checkpoint_every=1"))
    run = train(cfg, out_dir=tmp_path / "run", plots=False, console=quiet())
    with pytest.raises(ExportError, match="model.activation = relu"):
        export_hf(run.run_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------------------------------------
# writing: atomic, never over an existing folder unless asked; the CLI


def test_an_existing_export_is_kept_unless_overwrite_and_a_failed_write_leaves_it_whole(exports, tmp_path, monkeypatch):
    import shutil

    import safetensors.torch

    src = load_model(exports["dense"])
    out = tmp_path / "out"
    shutil.copytree(exports["dense"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="--overwrite"):
        write_hf_folder(src.model, src.cfg, src.tokenizer_path, out)

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_hf_folder(src.model, src.cfg, src.tokenizer_path, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    monkeypatch.undo()
    r = write_hf_folder(src.model, src.cfg, src.tokenizer_path, out, overwrite=True, step=7)
    assert r.architecture == "LlamaForCausalLM" and load_model(out).step == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # --overwrite replaces an export, never another folder (it deleted the user's files)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    with pytest.raises(ExportError, match="refusing to replace .*not a folder `moe-lm export` wrote"):
        write_hf_folder(src.model, src.cfg, src.tokenizer_path, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["important.txt"]


def test_cli_export_and_its_one_line_errors(exports, tmp_path, cli_here):
    run = Path(json.loads((exports["mixtral"] / "moe_lm.json").read_text())["exported_from"])
    code, out, err = cli_here("export", str(run), "--format", "hf", "--out", str(tmp_path / "m"))
    assert code == 0 and "MixtralForCausalLM" in out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    for args, fragment in ((["--out", str(tmp_path / "m")], "--overwrite"),
                           (["--format", "gguf", "--out", str(tmp_path / "g")], "--format gguf")):
        code, out, err = cli_here("export", str(run), *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    code, out, err = cli_here("export", str(run), "--out", str(tmp_path / "m"), "--overwrite")
    assert code == 0


def test_exported_and_checkpointed_weights_are_readable_like_every_other_file(exports):
    # safetensors' save_file writes 0600: a checkpoint or export shared with a group, or served by
    # another user, would not load (a newcomer's trial); now 0666 minus the umask, as the other files
    import os
    import stat

    from moe_lm.files import umask

    want = 0o666 & ~umask()
    export = exports["mixtral"]
    run = Path(json.loads((export / "moe_lm.json").read_text())["exported_from"])
    weights = [export / "model.safetensors", *sorted(run.parent.glob("step-*/model.safetensors"))]  # from a checkpoint
    assert len(weights) >= 2
    for f in weights + [export / "config.json"]:
        assert stat.S_IMODE(os.stat(f).st_mode) == want, f
