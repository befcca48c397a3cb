"""Prediction log and drift: every prediction goes to a request log (SQLite by default, PostgreSQL by
URL); the recent window is compared with the reference profile saved at training time by the
population stability index (PSI) of input length, predicted label and confidence.

Raw text is never stored unless asked: only its length and a hash.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

LENGTH_EDGES = [0, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000, 10**9]  # characters
CONFIDENCE_EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0 + 1e-9]
PROFILE_FILE = "reference_profile.json"
DEFAULT_THRESHOLDS = {"length": 0.25, "label": 0.25, "confidence": 0.25}  # PSI > 0.25: a significant shift


def _shares(counts) -> list[float]:
    total = float(sum(counts)) or 1.0
    return [c / total for c in counts]


def profile(lengths: list[int], labels: list[str], confidences: list[float], label_names: list[str]) -> dict:
    """Binned distributions of the three watched signals (input length in characters)."""
    return {
        "n": len(lengths),
        "length": {"edges": LENGTH_EDGES, "shares": _shares(np.histogram(lengths, LENGTH_EDGES)[0])},
        "confidence": {"edges": CONFIDENCE_EDGES, "shares": _shares(np.histogram(confidences, CONFIDENCE_EDGES)[0])},
        "label": {"names": label_names, "shares": _shares(_label_counts(labels, label_names))},
    }


NO_LABEL = "(none)"  # a multi-label prediction with no label above its threshold


def decision(result: dict) -> tuple[list[str], float]:
    """The labels a prediction chose and its confidence: the probability of the predicted label
    (multi-label: the least certain chosen label, or 1 - the highest if none was chosen). The server's
    log and the training-time reference profile both use this, so drift compares like with like."""
    label, probs = result["label"], result["probabilities"]
    if isinstance(label, list):
        return label, min((probs[lab] for lab in label), default=1 - max(probs.values(), default=0.0))
    return [label], probs[label]


def logged_label(labels: list[str]) -> str:
    """How the request log stores a prediction's labels (multi-label: joined by commas; none: empty)."""
    return ",".join(labels)


def profile_of(texts: list[str], results: list[dict], label_names: list[str]) -> dict:
    """The reference profile of predictions `results` on `texts`."""
    decisions = [decision(r) for r in results]
    return profile([len(t) for t in texts], [logged_label(labs) for labs, _ in decisions],
                   [conf for _, conf in decisions], label_names)


def _label_counts(labels: list[str], names: list[str]) -> list[int]:
    """How often each name was predicted. A multi-label prediction is its labels joined by commas (an
    empty string: none); each of its labels counts once, so the shares follow each label's rate."""
    index = {n: i for i, n in enumerate(names)}
    counts = [0] * len(names)
    for lab in labels:
        parts = [lab] if lab in index else (lab.split(",") if lab else [NO_LABEL])
        for part in parts:
            if part in index:
                counts[index[part]] += 1
    return counts


def psi(expected: list[float], actual: list[float], eps: float = 1e-4) -> float:
    """Population stability index: sum (a - e) * ln(a / e); < 0.1 stable, 0.1-0.25 moderate, > 0.25 shift."""
    return float(sum((a - e) * math.log((a + eps) / (e + eps)) for e, a in zip(expected, actual)))


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _connect(url: str):
    from tuneforge.errors import TuneforgeError

    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError:
            raise TuneforgeError("a PostgreSQL monitor URL needs the psycopg package", fix="pip install 'psycopg[binary]'") from None
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10), "%s"
        except psycopg.Error as err:
            reason = " ".join(str(err).split()) or type(err).__name__  # psycopg's message spans lines
            raise TuneforgeError(f"cannot open the request log at {redact(url)}: {reason}",
                                 fix="check that the PostgreSQL server runs and the URL's host, port, user, password "
                                     "and database are right (postgresql://USER:PASSWORD@HOST:PORT/DB)") from None
    if not url.startswith("sqlite:///"):
        raise TuneforgeError(f"unknown request-log URL {redact(url)}", fix="use sqlite:///PATH or postgresql://USER@HOST/DB")
    path = url.removeprefix("sqlite:///")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as err:
        raise TuneforgeError(f"cannot open the request log at {path}: {err}",
                             fix="pass --monitor-url sqlite:///PATH with a writable directory, or a postgresql:// URL") from None
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes, one fsync per checkpoint
    return conn, "?"


class RequestLog:
    """Append-only prediction log with retention; safe to call from the batching thread."""

    def __init__(self, url: str, retention_days: float = 30.0, keep_text: bool = False):
        self.conn, self.ph = _connect(url)
        self.retention_s = retention_days * 86400
        self.keep_text = keep_text
        self.lock = threading.Lock()
        self.conn.execute("CREATE TABLE IF NOT EXISTS predictions (ts DOUBLE PRECISION, input_chars INTEGER, "
                          "input_sha256 TEXT, label TEXT, confidence DOUBLE PRECISION, latency_ms DOUBLE PRECISION, text TEXT)")
        self._last_prune = 0.0

    def write(self, texts: list[str], labels: list[str], confidences: list[float], latency_ms: float) -> None:
        now = time.time()
        rows = [(now, len(t), hashlib.sha256(t.encode()).hexdigest(), lab, conf, latency_ms, t if self.keep_text else None)
                for t, lab, conf in zip(texts, labels, confidences)]
        sql = f"INSERT INTO predictions VALUES ({', '.join([self.ph] * 7)})"
        with self.lock:
            cur = self.conn.cursor()
            cur.executemany(sql, rows)
            if now - self._last_prune > 60:
                cur.execute(f"DELETE FROM predictions WHERE ts < {self.ph}", (now - self.retention_s,))
                self._last_prune = now

    def recent(self, limit: int) -> list[tuple]:
        with self.lock:
            cur = self.conn.cursor()
            cur.execute(f"SELECT input_chars, label, confidence FROM predictions ORDER BY ts DESC LIMIT {int(limit)}")
            return cur.fetchall()

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def drift_report(reference: dict | None, rows: list[tuple], thresholds: dict[str, float], min_rows: int = 50) -> dict:
    """PSI of each signal between the reference profile and the recent rows (input_chars, label, confidence)."""
    if reference is None:
        return {"status": "no_reference", "window": len(rows), "signals": {}}
    if len(rows) < min_rows:
        return {"status": "insufficient_data", "window": len(rows), "min_rows": min_rows, "signals": {}}
    lengths, labels, confs = zip(*rows)
    now = profile(list(lengths), list(labels), list(confs), reference["label"]["names"])
    signals = {}
    for name in ("length", "label", "confidence"):
        value = psi(reference[name]["shares"], now[name]["shares"])
        signals[name] = {"psi": round(value, 4), "threshold": thresholds[name], "drift": value > thresholds[name],
                         "reference": reference[name]["shares"], "recent": now[name]["shares"]}
    return {"status": "drift" if any(s["drift"] for s in signals.values()) else "ok", "window": len(rows), "signals": signals}


def log_url(run_dir: Path, url: str | None = None) -> str:
    """The request log's URL: `url`, or the SQLite file in the run directory."""
    return url or f"sqlite:///{run_dir / 'monitor.sqlite'}"


def load_reference(run_dir: Path) -> dict | None:
    for path in (run_dir / PROFILE_FILE, run_dir / "model" / PROFILE_FILE):
        if path.is_file():
            return json.loads(path.read_text())
    return None
