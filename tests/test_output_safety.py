"""The output folder under faults: one writer at a time (a second exits 2 naming the first, a dead one's lock is
taken over), and a write that fails (disk full) leaves no torn file, no run.json, and a checkpoint --resume finishes."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tuneforge import artifacts
from tuneforge.cli import main
from tuneforge.errors import OutputError
from tuneforge.lock import output_lock

from conftest import make_rows

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# `tuneforge run` that stops after training (checkpoint saved, the run not finished) until the test lets it go on
GATED_RUN = """
import pathlib, sys, time
from tuneforge import pipeline
from tuneforge.cli import main
gate, real = pathlib.Path(sys.argv[1]), pipeline.finalize
def finalize(*args, **kwargs):
    (gate / "ready").touch()
    while not (gate / "go").exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
pipeline.finalize = finalize
sys.exit(main(sys.argv[2:]))
"""

# holds OUT's lock until killed
HOLDER = """
import pathlib, sys, time
from tuneforge.lock import output_lock
with output_lock(pathlib.Path(sys.argv[1]), "tuneforge tune cfg.yaml", shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(600)
"""


def _config(tmp_path, base_config, write_csv):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(write_csv(make_rows(60)), train={"epochs": 2})))
    return path


def _holder(out, mode="exclusive"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), mode], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_second_writer_exits_2_naming_the_first_which_finishes(tmp_path, base_config, write_csv):
    cfg, out, gate = _config(tmp_path, base_config, write_csv), tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: a full pipe would stall the first process
    first = subprocess.Popen([sys.executable, "-c", GATED_RUN, str(gate), "run", str(cfg)], env=ENV, stdout=log,
                             stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (gate / "ready").exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # the first has reset OUT (the lock file survives it) and trained; run, tune and audit into OUT are refused
    assert json.loads((out / artifacts.LOCK_FILE).read_text())["pid"] == first.pid
    for argv in (["run", str(cfg)], ["run", str(cfg), "--overwrite"], ["audit", str(cfg)],
                 ["tune", str(cfg), "--output", str(out)]):
        second = subprocess.run([sys.executable, "-m", "tuneforge", *argv], env=ENV, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, (argv, second.stderr[-3000:])
        assert "Traceback" not in second.stderr
        assert f"error: {out} is in use by another tuneforge process: pid {first.pid} on " in second.stderr, argv
        assert "`tuneforge run " in second.stderr and "fix: wait for it to finish" in second.stderr
    (gate / "go").touch()
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log.close()
    assert (out / "run.json").is_file() and (out / "model" / "config.json").is_file()
    assert not (out / artifacts.LOCK_FILE).exists() and not list(out.rglob("*.tmp"))


def test_the_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path, base_config, write_csv, capsys):
    cfg, out = _config(tmp_path, base_config, write_csv), tmp_path / "out"
    holder = _holder(out)
    assert main(["audit", str(cfg)]) == 2  # alive: refused
    assert f"pid {holder.pid} on " in capsys.readouterr().err
    _kill(holder)  # kill -9: the file stays, the OS dropped the flock
    assert json.loads((out / artifacts.LOCK_FILE).read_text())["pid"] == holder.pid
    assert main(["run", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert f"notice: {out}: taking over the lock left by pid {holder.pid} on " in err and "no longer runs" in err
    assert (out / "run.json").is_file() and not (out / artifacts.LOCK_FILE).exists()


def test_workers_of_a_shared_study_hold_the_lock_together(tmp_path):
    out = tmp_path / "search"
    workers = [_holder(out, "shared"), _holder(out, "shared")]  # the second is let in beside the first
    try:
        with pytest.raises(OutputError, match=f"pid {workers[0].pid} on .*with any other workers of its search"):
            with output_lock(out, "tuneforge run cfg.yaml"):
                pass
        _kill(workers[0])
        with pytest.raises(OutputError):  # the other worker still holds it
            with output_lock(out, "tuneforge run cfg.yaml"):
                pass
    finally:
        for w in workers:
            if w.poll() is None:
                _kill(w)
    with output_lock(out, "tuneforge run cfg.yaml"):
        assert json.loads((out / artifacts.LOCK_FILE).read_text())["command"] == "tuneforge run cfg.yaml"
    assert not (out / artifacts.LOCK_FILE).exists()


def _disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["report.html", "model"])
def test_a_failed_write_leaves_nothing_torn_and_resume_finishes(failing, tmp_path, base_config, write_csv, capsys,
                                                                 monkeypatch):
    cfg, out = _config(tmp_path, base_config, write_csv), tmp_path / "out"
    if failing == "model":
        from tuneforge.models import load

        def export_model(model, tokenizer, out_dir):  # half a model folder, then the disk is full
            out_dir.mkdir(parents=True)
            (out_dir / "model.safetensors").write_bytes(b"\0" * 100)
            _disk_full()

        monkeypatch.setattr(load, "export_model", export_model)
    else:
        put = artifacts._put

        def half_then_full(tmp, data):
            if tmp.name != "report.html.tmp":
                return put(tmp, data)
            tmp.write_bytes(data[: len(data) // 2])
            _disk_full()

        monkeypatch.setattr(artifacts, "_put", half_then_full)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: cannot write {out / failing}: No space left on device" in err and "fix: disk full?" in err
    assert not (out / "run.json").exists()
    assert not list(out.rglob("*.tmp")) and not (out / "model.old").exists()
    assert (out / "model").is_dir() == (failing != "model")  # the model folder is whole or absent
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert (out / "checkpoint" / "state.json").is_file()  # kept: --resume finishes the run without retraining

    monkeypatch.undo()
    assert main(["run", str(cfg), "--resume"]) == 0
    assert (out / "run.json").is_file() and (out / "report.html").is_file()
    assert (out / "model" / "model.safetensors").stat().st_size > 100
    assert not (out / "checkpoint").exists() and not (out / artifacts.LOCK_FILE).exists()
