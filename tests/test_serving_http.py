"""The README's curl example, run as written against a real `tuneforge serve` process."""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stop_process, wait_ready

README = Path(__file__).resolve().parents[1] / "README.md"
CURL_PREFIX = 'curl -s -H "Authorization: Bearer change-me"'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_curl_line() -> str:
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith(CURL_PREFIX)]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_curl_example_gets_a_prediction(served_run, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    line = _readme_curl_line()
    assert "localhost:8000" in line
    port = _free_port()
    env = {**os.environ, "TUNEFORGE_API_KEY": "change-me", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(served_run), "--port", str(port),
                             "--host", "127.0.0.1", "--force", "--monitor-url", f"sqlite:///{tmp_path / 'log.sqlite'}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, lambda: proc.stdout.read1().decode())

        argv = shlex.split(line.replace("localhost:8000", f"127.0.0.1:{port}"))
        curl_env = {**os.environ, "NO_PROXY": "*", "no_proxy": "*"}  # straight to the loopback server
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=curl_env)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        labels = set(json.loads((served_run / "model" / "config.json").read_text())["id2label"].values())
        assert "predictions" in body, body
        assert len(body["predictions"]) == 1
        assert body["predictions"][0]["label"] in labels, (body, labels)
    finally:
        stop_process(proc)
