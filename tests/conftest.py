"""Tiny random models and small data sets, built in seconds inside the tests. Nothing is downloaded."""
from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POSITIVE = "good great superb lovely moving brilliant fun charming".split()
NEGATIVE = "bad awful dull boring weak clumsy tedious flat".split()
FILLER = "the film movie plot actor story scenes was is a and very quite".split()


def stop_process(proc) -> None:
    """Terminate a server process the test started; kill it if it has not exited 10 s later."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(base_url: str, proc, output, timeout: float = 60, path: str = "/ready") -> None:
    """Poll a server process's `path` until it answers 200; fail with its output (`output()`) if it exits first or
    is not ready within `timeout` seconds."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}{path}", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail("server exited: " + output())
    pytest.fail("server did not become ready: " + output())


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Review-like rows whose label follows its sentiment words; `topic` is a column that is not an input."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(FILLER, rng.randint(2, 6))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label, "topic": rng.choice(["a", "b"])})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with a word-level tokenizer, saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    import torch

    path = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(POSITIVE + NEGATIVE + FILLER)) + [str(i) for i in range(300)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def write_csv(tmp_path):
    def write(rows: list[dict], name: str = "data.csv"):
        import pandas as pd

        path = tmp_path / name
        pd.DataFrame(rows).to_csv(path, index=False)
        return path

    return write


@pytest.fixture
def base_config(tiny_model_dir, tmp_path):
    """A fast run config on the tiny model; tests fill in data.path."""
    def make(data_path, **sections) -> dict:
        raw = {
            "data": {"path": str(data_path), "val_fraction": 0.2, "test_fraction": 0.2},
            "model": {"name": str(tiny_model_dir), "max_length": 32},
            "train": {"epochs": 3, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 2,
                      "early_stopping_patience": 0},
            "eval": {"bootstrap_samples": 50, "batch_size": 16},
            "output": {"dir": str(tmp_path / "out")},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw

    return make


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on a free loopback port, or TUNEFORGE_TEST_POSTGRES_URL if set.

    Skipped where neither PostgreSQL (initdb, pg_ctl) nor psycopg is installed; `.ci/run` installs both.
    """
    pytest.importorskip("psycopg")
    if os.environ.get("TUNEFORGE_TEST_POSTGRES_URL"):
        yield os.environ["TUNEFORGE_TEST_POSTGRES_URL"]
        return
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    import glob

    path = os.pathsep.join([os.environ.get("PATH", "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin")))  # Debian's
    initdb, pg_ctl = shutil.which("initdb", path=path), shutil.which("pg_ctl", path=path)
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (initdb / pg_ctl not on PATH)")
    root = tempfile.mkdtemp(prefix="tuneforge-pg-")
    run_as = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = f"{root}/data"
    subprocess.run(run_as + [initdb, "-D", data, "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run(run_as + [pg_ctl, "-D", data, "-l", f"{root}/log", "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the test server, for one test."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, tiny_model_dir):
    """A finished, promoted run on the tiny model, for the serving and monitoring tests."""
    import pandas as pd

    from tuneforge.config import parse_config
    from tuneforge.pipeline import run

    d = tmp_path_factory.mktemp("serve")
    pd.DataFrame(make_rows(200)).to_csv(d / "data.csv", index=False)  # 60 test rows: a reference profile drift can rest on
    cfg = parse_config({"data": {"path": str(d / "data.csv"), "val_fraction": 0.2, "test_fraction": 0.3},
                        "model": {"name": str(tiny_model_dir), "max_length": 32},
                        "train": {"method": "full", "epochs": 2, "batch_size": 8, "learning_rate": 5e-3},
                        "eval": {"bootstrap_samples": 20}, "output": {"dir": str(d / "out")}})
    run(cfg)
    return d / "out"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer Llama (hidden 32) with a word-level tokenizer and a ChatML chat template, saved as a Hugging Face
    directory: what the causal-LM tests fine-tune (tests/tiny_models.py builds it)."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
