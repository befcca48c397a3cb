"""Prediction log and drift: every prediction goes to a request log (SQLite by default, PostgreSQL by
URL); the recent window is compared with the reference profile saved at training time by the
population stability index (PSI) of input size (the `length` signal: characters of a text, by default; a task
measures its own inputs), the task's own input measures (an image's brightness), predicted label and confidence.

Raw input is never stored unless asked: only its size and a hash.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from tuneforge.drift import DEFAULT_THRESHOLDS, PROFILE_FILE, SIGNALS, profile, psi

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
                          "input_sha256 TEXT, label TEXT, confidence DOUBLE PRECISION, latency_ms DOUBLE PRECISION, "
                          "text TEXT, measures TEXT)")
        cur = self.conn.cursor()
        cur.execute("SELECT * FROM predictions WHERE 1 = 0")
        if "measures" not in [d[0] for d in cur.description]:  # a log written before tasks measured their inputs
            self.conn.execute("ALTER TABLE predictions ADD COLUMN measures TEXT")
        self._last_prune = 0.0

    def write(self, inputs: list, labels: list[str], confidences: list[float], latency_ms: float,
              sizes: list[int] | None = None, measures: list[dict] | None = None) -> None:
        """One row per prediction. `sizes`: each input's size by the task's measure (default: characters of a text);
        it goes in the column input_chars (the name predates inputs other than text). `measures`: each input's values
        of the task's own input measures (an image's brightness), kept as JSON."""
        now = time.time()
        sizes = sizes if sizes is not None else [len(x) for x in inputs]
        measures = [json.dumps(m) if m else None for m in measures] if measures is not None else [None] * len(inputs)
        texts = [x if isinstance(x, str) else repr(x) for x in inputs]
        rows = [(now, size, hashlib.sha256(t.encode()).hexdigest(), lab, conf, latency_ms, t if self.keep_text else None, m)
                for t, size, lab, conf, m in zip(texts, sizes, labels, confidences, measures)]
        columns = "ts, input_chars, input_sha256, label, confidence, latency_ms, text, measures"
        sql = f"INSERT INTO predictions ({columns}) VALUES ({', '.join([self.ph] * 8)})"
        with self.lock:
            cur = self.conn.cursor()
            cur.executemany(sql, rows)
            if now - self._last_prune > 60:
                cur.execute(f"DELETE FROM predictions WHERE ts < {self.ph}", (now - self.retention_s,))
                self._last_prune = now

    def recent(self, limit: int) -> list[tuple]:
        """The newest `limit` rows, newest first: (size, label, confidence, the input's measures: a dict)."""
        with self.lock:
            cur = self.conn.cursor()
            cur.execute(f"SELECT input_chars, label, confidence, measures FROM predictions ORDER BY ts DESC LIMIT {int(limit)}")
            return [(size, label, conf, json.loads(m) if m else {}) for size, label, conf, m in cur.fetchall()]

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def drift_report(reference: dict | None, rows: list[tuple], thresholds: dict[str, float], min_rows: int = 50) -> dict:
    """PSI of each signal between the reference profile and the recent rows (input size, label, confidence and, as
    `recent` gives them, the input's measures): the size, label, confidence and count signals, then each input measure
    the reference holds (its name is the signal's; the threshold of a measure not in `thresholds` is 0.25)."""
    if reference is None:
        return {"status": "no_reference", "window": len(rows), "signals": {}}
    if len(rows) < min_rows:
        return {"status": "insufficient_data", "window": len(rows), "min_rows": min_rows, "signals": {}}
    lengths, labels, confs = (list(col) for col in zip(*(row[:3] for row in rows)))
    edges = reference.get("length", {}).get("edges")  # the task's bins of its input size (characters of a text)
    watched = reference.get("inputs", {})
    measures = {name: (ref["edges"], [row[3].get(name) if len(row) > 3 else None for row in rows])
                for name, ref in watched.items()}
    now = profile(lengths, labels, confs, reference.get("label", {}).get("names", []), edges, measures)
    pairs = [(name, reference[name], now[name]) for name in SIGNALS if name in reference]  # an older reference lacks some
    pairs += [(name, ref, now["inputs"][name]) for name, ref in watched.items() if name in now.get("inputs", {})]
    signals = {}
    for name, ref, recent in pairs:
        value = psi(ref["shares"], recent["shares"])
        limit = thresholds.get(name, DEFAULT_THRESHOLDS.get(name, 0.25))
        signals[name] = {"psi": round(value, 4), "threshold": limit, "drift": value > limit,
                         "reference": ref["shares"], "recent": recent["shares"]}
    return {"status": "drift" if any(s["drift"] for s in signals.values()) else "ok", "window": len(rows), "signals": signals}


def log_url(run_dir: Path, url: str | None = None) -> str:
    """The request log's URL: `url`, or the SQLite file in the run directory."""
    return url or f"sqlite:///{run_dir / 'monitor.sqlite'}"


def load_reference(run_dir: Path) -> dict | None:
    for path in (run_dir / PROFILE_FILE, run_dir / "model" / PROFILE_FILE):
        if path.is_file():
            return json.loads(path.read_text())
    return None
