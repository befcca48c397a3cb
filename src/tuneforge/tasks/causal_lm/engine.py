"""Batched generation for serving: concurrent requests share one decode loop (continuous batching).

    decoder = Decoder.of(predictor)
    results = generate_rows(decoder, [Row(prompt_ids, Params(max_tokens=64)), ...])   # one wave, no HTTP

A wave prefills its rows together (left padding, attention mask, position ids), then steps every row one
token at a time with the model's own KV cache. `Engine` runs waves in a worker thread: requests that arrive
while a wave runs are prefilled on their own at the next step boundary and merged into the running cache
(the narrower cache is left-padded with masked columns), so a new request never waits for a long one to end.
Models whose cache is not plain per-layer key/value tensors (sliding-window layers) run static waves instead:
newcomers wait for the running wave to end. Rows that finish, or whose client went away, leave the batch at
once (their cache rows are dropped).

Each row stops at EOS / end of turn (CompletionPredictor.stops), at a stop string, or after max_tokens, and
samples with its own temperature / top_p and its own torch.Generator seeded by `seed`. Greedy output is the
same alone or batched, streamed or not, and equals `generate_ids` (model.generate); a sampled row is repeated
exactly by the same seed in the same batch composition (batching changes the logits in the last bits, which
can, rarely, change a draw).

Text goes out incrementally: after each token the row's whole token list is decoded and the new suffix is
sent; a trailing partial UTF-8 character ('\ufffd'), trailing whitespace (the result is stripped, as
`tuneforge predict`'s is) and a tail that may begin a stop string are held back until they resolve.

Test hook: `Engine(hold=...)`; while hold() is true no new rows are admitted (the server's
TUNEFORGE_TEST_HOLD_FILE), so a test can queue requests and release them into one wave.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from tuneforge.models.infer import autocast

log = logging.getLogger("tuneforge.serve")


@dataclass
class Params:
    max_tokens: int
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(eq=False)
class Row:
    """One request's sequence. The callbacks run in the generation thread: `on_text(delta)` for each new piece of
    text, `on_done(result)` once, with the result dict (also for a cancelled or failed row)."""
    prompt: list[int]
    params: Params
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[dict], None] | None = None
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    cached: int = 0            # real tokens in the KV cache: the next token's position
    cancelled: bool = False
    done: bool = False
    generator: torch.Generator | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    t_first: float | None = None
    result: dict | None = None

    def cancel(self) -> None:
        """Thread-safe: the engine drops the row at its next step."""
        self.cancelled = True


class Decoder:
    """The model and what decoding needs of it: tokenizer, stop ids, pad id, precision."""

    def __init__(self, model, tokenizer, stops: list[int], pad_id: int, precision: str = "fp32"):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.stops, self.pad_id = set(stops), pad_id
        self.device = next(model.parameters()).device
        names = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in names else "past_key_values"  # renamed in transformers 5.x
        self.keep_last = "logits_to_keep" in names

    @classmethod
    def of(cls, predictor, precision: str | None = None) -> "Decoder":
        return cls(predictor.model, predictor.tokenizer, predictor.stops, predictor.pad_id,
                   predictor.precision if precision is None else precision)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache=None, last_only=False):
        """(logits of the last position per row, the cache)."""
        kwargs = {self.cache_kw: cache} if cache is not None else {}
        if last_only and self.keep_last:
            kwargs["logits_to_keep"] = 1
        with autocast(self.device, self.precision):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=positions.to(self.device),
                             use_cache=True, **kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :].float(), new_cache


# ------------------------------------------------------------------ text of a row

def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that begins a stop string (held back until it resolves)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def visible_text(decoder: Decoder, row: Row, final: bool) -> tuple[str, bool]:
    """(the row's text that can go out now, whether a stop string ended it)."""
    raw = decoder.tokenizer.decode(row.tokens, skip_special_tokens=True)
    hits = [i for i in (raw.find(s) for s in row.params.stop) if i >= 0]
    if hits:
        return raw[: min(hits)].strip(), True
    if final:
        return raw.strip(), False
    text = raw.lstrip()
    while True:  # trailing whitespace (stripped at the end), partial UTF-8 characters and a stop's beginning wait
        shorter = text.rstrip().rstrip("\ufffd")
        shorter = shorter[: len(shorter) - _stop_prefix(shorter, row.params.stop)]
        if shorter == text:
            return text, False
        text = shorter


def _send(row: Row, text: str) -> None:
    if text.startswith(row.sent) and len(text) > len(row.sent):  # a decode that rewrites its past waits
        delta, row.sent = text[len(row.sent):], text
        if row.on_text:
            row.on_text(delta)


def _finish(decoder: Decoder | None, row: Row, reason: str, text: str | None = None, error: str | None = None) -> None:
    """End the row: send the rest of its text (unless cancelled or failed) and hand over its result."""
    if row.done:
        return
    row.done = True
    if reason in ("cancelled", "error"):
        text = row.sent if text is None else text
    elif text is None:
        text = visible_text(decoder, row, final=True)[0] if row.tokens else ""
    if reason in ("stop", "length"):
        _send(row, text)
    now = time.perf_counter()
    result = {"completion": text, "finish_reason": reason, "prompt_tokens": len(row.prompt),
              "completion_tokens": len(row.tokens), "max_tokens": row.params.max_tokens,
              "ttft_s": None if row.t_first is None else row.t_first - row.t_submit,
              "tokens_per_s": len(row.tokens) / (now - row.t_start) if row.t_start and row.tokens and now > row.t_start else None,
              "seconds": now - row.t_submit}
    if error:
        result["error"] = error
    row.result = result
    if row.on_done:
        try:
            row.on_done(result)
        except Exception:  # the caller's bookkeeping failing must not fail the other rows of the wave
            log.exception("a generation callback failed")


def _advance(decoder: Decoder, row: Row, token: int) -> None:
    """Take the row's next token: finish it on a stop token, a stop string or max_tokens, else send new text."""
    if row.t_first is None:
        row.t_first = time.perf_counter()
    if token in decoder.stops:
        _finish(decoder, row, "stop")
        return
    row.tokens.append(token)
    text, stopped = visible_text(decoder, row, final=False)
    if stopped:
        _finish(decoder, row, "stop", text)
    elif len(row.tokens) >= row.params.max_tokens:
        _finish(decoder, row, "length")
    else:
        _send(row, text)


def _choose(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Each row's next token: argmax when greedy, else a draw from its temperature / top_p distribution with its
    own generator."""
    chosen = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        p = row.params
        if p.temperature <= 0:
            continue
        # shifted so the top logit is 0, and a temperature under 1e-30 (OpenAI allows any above 0) taken as 1e-30: a
        # tiny one would otherwise turn the logits into inf and the probabilities into NaN, failing the whole wave
        probs = torch.softmax((logits[i] - logits[i].max()) / max(p.temperature, 1e-30), dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p >= p.top_p  # the smallest set reaching top_p
            outside[0] = False  # the top one always stays (a top_p under float32's smallest, 1e-45, compares as 0)
            sorted_p[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        if row.generator is None:
            row.generator = torch.Generator(device=logits.device)
            if p.seed is None:
                row.generator.seed()
            else:
                row.generator.manual_seed(p.seed)
        chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return chosen


# ------------------------------------------------------------------ waves

@dataclass
class Wave:
    """Rows decoded together: their cache, the attention mask over it (1 = a real token), and each row's token
    chosen last and not yet in the cache."""
    rows: list[Row]
    cache: object
    mask: torch.Tensor
    pending: list[int]
    joinable: bool


def _plain_layers(cache) -> list | None:
    """The cache's layers when each is a plain growing key/value pair (what merging and trimming handle)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return list(layers)


def prefill(decoder: Decoder, rows: list[Row], on_forward: Callable[[int], None] | None = None) -> Wave | None:
    """Run the rows' prompts (left-padded) and take each row's first token; the rows still going, as a wave."""
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), decoder.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt):] = 1
        r.t_start = time.perf_counter()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as model.generate builds them
    mask = mask.to(decoder.device)
    if on_forward:
        on_forward(len(rows))
    logits, cache = decoder.forward(ids, mask, positions, last_only=True)
    for r in rows:
        r.cached = len(r.prompt)
    wave = Wave(rows, cache, mask, _choose(logits, rows), _plain_layers(cache) is not None)
    _advance_all(decoder, wave)
    return compact(wave)


def step(decoder: Decoder, wave: Wave, on_forward: Callable[[int], None] | None = None) -> Wave | None:
    """One token for every row of the wave."""
    rows = wave.rows
    wave.mask = torch.cat([wave.mask, torch.ones((len(rows), 1), dtype=wave.mask.dtype, device=wave.mask.device)], 1)
    ids = torch.tensor(wave.pending, dtype=torch.long)[:, None]
    positions = torch.tensor([r.cached for r in rows], dtype=torch.long)[:, None]
    if on_forward:
        on_forward(len(rows))
    logits, wave.cache = decoder.forward(ids, wave.mask, positions, wave.cache)
    for r in rows:
        r.cached += 1
    wave.pending = _choose(logits, rows)
    _advance_all(decoder, wave)
    return compact(wave)


def _advance_all(decoder: Decoder, wave: Wave) -> None:
    for r, token in zip(wave.rows, wave.pending):
        if not r.cancelled:  # a row whose client left gets nothing more; compact() drops it
            _advance(decoder, r, token)


def compact(wave: Wave) -> Wave | None:
    """Drop finished and cancelled rows (their cache rows too) and the cache columns no row uses; None when empty."""
    for r in wave.rows:
        if r.cancelled:
            _finish(None, r, "cancelled")
    keep = [i for i, r in enumerate(wave.rows) if not r.done and not r.cancelled]
    if not keep:
        return None
    if len(keep) < len(wave.rows):
        index = torch.tensor(keep, device=wave.mask.device)
        wave.cache.batch_select_indices(index)
        wave.mask = wave.mask[index]
        wave.rows = [wave.rows[i] for i in keep]
        wave.pending = [wave.pending[i] for i in keep]
        layers = _plain_layers(wave.cache) if wave.joinable else None
        first = int(wave.mask.any(0).int().argmax())  # left padding every remaining row has in common
        if layers and first > 0:
            wave.mask = wave.mask[:, first:]
            for layer in layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
    return wave


def _left_pad(wave: Wave, width: int) -> None:
    extra = width - wave.mask.shape[1]
    if extra <= 0:
        return
    wave.mask = torch.cat([wave.mask.new_zeros((wave.mask.shape[0], extra)), wave.mask], 1)
    for layer in _plain_layers(wave.cache):
        pad = layer.keys.new_zeros((*layer.keys.shape[:2], extra, layer.keys.shape[3]))
        layer.keys = torch.cat([pad, layer.keys], -2)
        pad = layer.values.new_zeros((*layer.values.shape[:2], extra, layer.values.shape[3]))
        layer.values = torch.cat([pad, layer.values], -2)


def join(wave: Wave, new: Wave) -> Wave:
    """One wave of both: the narrower cache left-padded with masked columns, then stacked by rows."""
    width = max(wave.mask.shape[1], new.mask.shape[1])
    _left_pad(wave, width)
    _left_pad(new, width)
    wave.mask = torch.cat([wave.mask, new.mask], 0)
    for mine, theirs in zip(_plain_layers(wave.cache), _plain_layers(new.cache)):
        mine.keys = torch.cat([mine.keys, theirs.keys], 0)
        mine.values = torch.cat([mine.values, theirs.values], 0)
    wave.rows += new.rows
    wave.pending += new.pending
    return wave


def generate_rows(decoder: Decoder, rows: list[Row], on_forward: Callable[[int], None] | None = None) -> list[dict]:
    """Generate every row in one wave, in this thread; the results in row order (the decode loop without a server)."""
    wave = prefill(decoder, rows, on_forward)
    while wave is not None:
        wave = step(decoder, wave, on_forward)
    return [r.result for r in rows]


# ------------------------------------------------------------------ the worker

class Engine:
    """The generation thread: admits waiting rows (up to max_batch_size in all) at each step boundary and steps
    the running wave. Under load (the last wave held several rows, or rows were waiting as it ended) a new wave
    waits up to max_wait_ms for more to arrive, as the classification MicroBatcher does; an idle engine starts at once."""

    def __init__(self, decoder: Decoder, max_batch_size: int = 64, max_wait_ms: float = 10.0,
                 on_forward: Callable[[int], None] | None = None, hold: Callable[[], bool] | None = None):
        self.decoder, self.max_batch_size, self.max_wait = decoder, max(1, max_batch_size), max_wait_ms / 1000
        self.on_forward, self.hold = on_forward, hold
        self._queue: deque[Row] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._under_load = False
        self._thread = threading.Thread(target=self._run, name="tuneforge-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, row: Row) -> None:
        """Thread-safe (the event loop calls it)."""
        row.t_submit = time.perf_counter()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the generation engine is stopping")
            self._queue.append(row)
            self._cond.notify()

    def _take(self, limit: int, idle: bool) -> list[Row]:
        """Waiting rows to admit, up to `limit`; an idle engine blocks for the first (and under load waits briefly for
        more). Cancelled rows are finished on the way."""
        with self._cond:
            if idle:
                while not self._queue and not self._stopping:
                    self._cond.wait(0.5)
                if self.hold is not None and self.hold():  # held while it waited: the rows stay queued
                    return []
                if self._under_load and self.max_wait > 0:
                    deadline = time.perf_counter() + self.max_wait
                    while len(self._queue) < limit and not self._stopping and (left := deadline - time.perf_counter()) > 0:
                        self._cond.wait(left)
            taken = []
            while self._queue and len(taken) < limit:
                taken.append(self._queue.popleft())
        live = [r for r in taken if not r.cancelled]
        for r in taken:
            if r.cancelled:
                _finish(self.decoder, r, "cancelled")
        return live

    def _drop_cancelled_waiting(self) -> None:
        with self._cond:
            gone = [r for r in self._queue if r.cancelled]
            for r in gone:
                self._queue.remove(r)
        for r in gone:
            _finish(self.decoder, r, "cancelled")

    def _run(self) -> None:
        wave: Wave | None = None
        peak = 0  # the most rows the current wave held
        while not self._stopping:
            new: list[Row] = []
            try:
                held = self.hold is not None and self.hold()
                if held:
                    self._drop_cancelled_waiting()
                if wave is not None:
                    wave = compact(wave)  # rows whose client went away leave before the next forward pass
                if not held and (wave is None or wave.joinable):
                    room = self.max_batch_size - (len(wave.rows) if wave else 0)
                    new = self._take(room, idle=wave is None) if room > 0 else []
                elif wave is None:
                    time.sleep(0.01)
                    continue
                peak = max(peak, len(new) + (len(wave.rows) if wave else 0))
                if new:
                    fresh, new = prefill(self.decoder, new, self.on_forward), []
                    if fresh is not None:
                        wave = fresh if wave is None else join(wave, fresh)
                if wave is not None:
                    wave = step(self.decoder, wave, self.on_forward)
            except Exception as err:  # a failed forward pass fails its rows; the engine keeps serving
                for r in (wave.rows if wave else []) + new:
                    _finish(self.decoder, r, "error", "", error=f"{type(err).__name__}: {err}")
                wave = None
            if wave is None and peak:
                with self._cond:
                    self._under_load = peak > 1 or bool(self._queue)
                peak = 0
        with self._cond:
            left, self._queue = list(self._queue), deque()
        for r in left + (wave.rows if wave else []):
            _finish(self.decoder, r, "error", "", error="the server is shutting down")
