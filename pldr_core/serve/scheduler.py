"""Continuous batching: a fixed set of rows over one preallocated KV-cache, decoded together.

One background thread owns the model. Between decode steps it admits queued requests into free rows
(each prompt prefilled alone, unpadded, into its row: A sums over every token, so padding would change
it) and retires finished rows (EOS, max_tokens, a stop string, a client that went away). A decode step
runs every row at once with per-row positions; a free row is fed a harmless token at position 0 and
its output dropped (the row is prefilled afresh when a request takes it). Each request samples with
its own ``Sampler``, so a row gets the tokens it would get alone.

While every row decodes greedily without logprobs and the step can (the static engine), rows run
``step.chunk`` steps per launch instead, each token chosen and fed back on the device; the host takes in
a chunk's tokens (one event per row) while the next chunk runs, so rows that finished or were freed in
between run on unused until it lands. A new row's first token comes from its prefill, as with single
steps. Any other request turns the batch back to single steps (the chunk in flight taken in
first) until it is done.

The step itself sits behind ``DecodeStep`` (``pldr_core.serve.steps``: a prefill of rows and a
decode step of all rows): the eager model's cached forward, or the static-cache engine's compiled step.
Results go back through each request's ``emit`` callback, called on the scheduler thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pldr_core.device import ids_on
from pldr_core.sampling import Sampler
from pldr_core.serve.steps import DecodeStep
from pldr_core.serve.text import TextStream, plain_pieces

log = logging.getLogger("pldr.serve")

# Seconds of history behind the tokens/s gauge.
RATE_WINDOW_S = 10.0


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] | None
    offset: int
    """Where the token's text starts in the completion's text."""


@dataclass
class Event:
    """What a request hears back: new tokens (and the text they settle), the finish, or an error."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    """'stop' (EOS or a stop string) or 'length' on the last event of a request."""
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    """One prompt to complete (one choice of an API request)."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """None: no logprobs; N >= 0: the chosen token's logprob and the N most likely alternatives."""
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    job: Job
    text: TextStream
    new_ids: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Where the last chosen token goes when it is fed back."""
        return len(self.job.prompt) + len(self.new_ids) - 1


class Scheduler:
    """Runs ``DecodeStep`` rows for submitted ``Job``s on one background thread (``start`` / ``stop``)."""

    def __init__(self, step: DecodeStep, tokenizer, *, eos_id: int):
        self.step, self.tok, self.eos_id = step, tokenizer, eos_id
        self._pieces = plain_pieces(tokenizer)
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._pending: collections.deque[Job] = collections.deque()
        self._rows: dict[int, _Row] = {}
        self._free = list(range(step.batch - 1, -1, -1))
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._inflight = None  # (Readback, rows at its launch) of the chunk the host has not taken in yet
        self._firsts = None  # (Readback, rows) of the first tokens of rows admitted for the next chunk
        self._inputs_on_host = True  # the rows' next inputs are new_ids[-1] at position, not on the device
        self.counts = {"jobs": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0, "steps": 0,
                       "chunks": 0}

    @property
    def max_len(self) -> int:
        return self.step.max_len

    # ---- the HTTP side (any thread) -----------------------------------------------------------
    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def start(self) -> None:
        self._stopping = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="pldr-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def metrics(self) -> dict:
        """Counters and gauges; safe to call from any thread."""
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._recent if now - t <= RATE_WINDOW_S)
        span = min(RATE_WINDOW_S, now - self._started)
        return {**self.counts, "queued": self._inbox.qsize() + len(self._pending),
                "active": len(self._rows), "rows": self.step.batch,
                "tokens_per_s": recent / span if span > 0 else 0.0}

    # ---- the scheduler thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._take(block=not self._rows and self._inflight is None)
            self._retire_cancelled()
            try:
                if self._chunked():
                    if self._inputs_on_host:
                        self._upload_inputs()
                    self._admit(on_device=True)
                    self._chunk_step()
                    continue
                self._drain()
            except Exception as exc:  # a failed chunk fails its rows, not the server
                log.exception("decode chunk failed")
                self._inflight = self._firsts = None
                self._fail_all(f"{type(exc).__name__}: {exc}")
                continue
            self._admit()
            if self._rows:
                try:
                    self._decode()
                except Exception as exc:  # a failed step fails its rows, not the server
                    log.exception("decode step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _chunked(self) -> bool:
        """Whether the next rows all decode greedily without logprobs: then they run ``step.chunk``
        steps a launch, tokens chosen on the device, and the host reads them back one chunk behind."""
        if not self.step.chunk:
            return False
        admitted = itertools.islice(self._pending, len(self._free))
        return all(_plain_greedy(job) for job in itertools.chain((r.job for r in self._rows.values()), admitted))

    def _take(self, block: bool) -> None:
        try:
            job = self._inbox.get(block=block and not self._pending)
            while True:
                if job is not None:
                    self._pending.append(job)
                    self.counts["jobs"] += 1
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _retire_cancelled(self) -> None:
        for b in [b for b, row in self._rows.items() if row.job.cancelled.is_set()]:
            self._free_row(b, "cancelled")

    def _admit(self, on_device: bool = False) -> None:
        """Give queued jobs the free rows and prefill them together (one failed prefill fails them).
        ``on_device``: prefilled by ``step.start_rows`` without waiting for the device, which also
        leaves each row's greedy first token there as its next input; the host reads the first tokens
        back after the chunk in flight (``_take_firsts``)."""
        admitted: dict[int, _Row] = {}
        while self._free and self._pending:
            job = self._pending.popleft()
            if job.cancelled.is_set():
                self.counts["cancelled"] += 1
                continue
            b = self._free.pop()
            admitted[b] = self._rows[b] = _Row(job, TextStream(self.tok, job.prompt, job.stop, self._pieces))
        if not admitted:
            return
        try:
            device = self.step.device
            prompts = [ids_on(row.job.prompt, device) for row in admitted.values()]
            if on_device:  # taken in with the chunk before it (_take_firsts)
                self._firsts = (self.step.start_rows(list(admitted), prompts), admitted)
                return
            logits = self.step.prefill_rows(list(admitted), prompts)
            self._choose(admitted, logits, {b: i for i, b in enumerate(admitted)})
        except Exception as exc:  # a failed prefill fails its requests, not the server
            log.exception("prefill failed")
            for b, row in admitted.items():
                if b in self._rows:
                    _send(row.job, Event(index=row.job.index, error=f"{type(exc).__name__}: {exc}"))
                    self._free_row(b, "failed")

    def _upload_inputs(self) -> None:
        """Hand the rows' next inputs, known on the host after single steps, to the device."""
        tokens = [0] * self.step.batch
        positions = [0] * self.step.batch
        for b, row in self._rows.items():
            tokens[b], positions[b] = row.new_ids[-1], row.position
        self.step.set_inputs(tokens, positions)
        self._inputs_on_host = False

    def _chunk_step(self) -> None:
        """Launch the next chunk of every row, then take in the one before it (which the device has
        finished or is finishing), so that the host's work overlaps the device's."""
        launched = None
        if self._rows:
            launched = (self.step.launch(), dict(self._rows))
            self.counts["steps"] += self.step.chunk
            self.counts["chunks"] += 1
        self._in_flight(launched)

    def _drain(self) -> None:
        """Take in the chunk in flight, if any: the rows' inputs are then known on the host."""
        self._in_flight(None)
        self._inputs_on_host = True

    def _in_flight(self, launched) -> None:
        """Make ``launched`` (or nothing) the chunk in flight; take in the one it replaces, then the
        first tokens of the rows admitted before it."""
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._take_chunk(*previous)
        self._take_firsts()

    def _take_firsts(self) -> None:
        """Send the first tokens of the rows admitted last, before any chunk of theirs is taken in."""
        if self._firsts is None:
            return
        (readback, rows), self._firsts = self._firsts, None
        first = readback.values()
        for (b, row), token in zip(rows.items(), first):
            if self._rows.get(b) is row:
                self._accept(b, row, [token])
        self._count(len(first))

    def _take_chunk(self, chunk, rows: dict[int, _Row]) -> None:
        """Accept each row's tokens of ``chunk``; rows that finished or were freed since its launch (its
        later tokens run on unused) are skipped."""
        ids = chunk.values()
        taken = 0
        for b, row in rows.items():
            if self._rows.get(b) is row:
                taken += self._accept(b, row, ids[b][1:])  # column 0: the input, already taken
        self._count(taken)

    def _decode(self) -> None:
        tokens = [0] * self.step.batch
        positions = [0] * self.step.batch
        for b, row in self._rows.items():
            tokens[b], positions[b] = row.new_ids[-1], row.position
        device = self.step.device
        logits = self.step.step(torch.tensor(tokens, device=device), torch.tensor(positions, device=device))
        self.counts["steps"] += 1
        rows = dict(self._rows)
        self._choose(rows, logits, {b: b for b in rows})

    def _choose(self, rows: dict[int, _Row], logits: torch.Tensor, at: dict[int, int]) -> None:
        """Sample each row's next token from ``logits[at[b]]``: the greedy rows in one argmax."""
        greedy = [b for b, row in rows.items() if row.job.sampler.greedy]
        chosen = {}
        if greedy:
            # One argmax over every row of the step (free ones too) beats gathering the greedy rows.
            best = logits.argmax(-1).tolist()
            chosen.update((b, best[at[b]]) for b in greedy)
        for b, row in rows.items():
            if b not in chosen:
                chosen[b] = int(row.job.sampler(logits[at[b]:at[b] + 1])[0])
        for b, row in rows.items():
            self._accept(b, row, [chosen[b]], None if row.job.logprobs is None else logits[at[b]])
        self._count(len(rows))

    def _count(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            while now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()

    def _accept(self, b: int, row: _Row, tokens: list[int], logits: torch.Tensor | None = None) -> int:
        """Append ``tokens`` to row ``b`` up to its finish and send them as one event; with
        ``logits`` [V] (one token of a request that asked for logprobs) also its logprobs. Returns how
        many were taken."""
        job = row.job
        taken = tokens[:job.max_tokens - len(row.new_ids)]
        if self.eos_id in taken:
            taken = taken[:taken.index(self.eos_id) + 1]
        at_eos = taken[-1] == self.eos_id
        final = at_eos or len(row.new_ids) + len(taken) >= job.max_tokens
        offset = len(row.text.text)
        if job.stop:  # token by token: a stop string ends the completion at the token that makes it
            texts = []
            for i, token in enumerate(taken):
                texts.append(row.text.push(token, final and i == len(taken) - 1))
                if row.text.stopped:
                    taken, final = taken[:i + 1], True
                    break
            text = "".join(texts)
        else:
            text = row.text.extend(taken, final)
        row.new_ids += taken
        self.counts["tokens"] += len(taken)
        finish = ("stop" if at_eos or row.text.stopped else "length") if final else None
        event = Event(index=job.index, text=text, token_ids=taken, finish_reason=finish,
                      prompt_tokens=len(job.prompt), completion_tokens=len(row.new_ids))
        if logits is not None:
            event.logprobs.append(self._logprob(taken[-1], logits, job.logprobs, offset))
        _send(job, event)
        if finish is not None:
            self._free_row(b, "finished")
        return len(taken)

    def _logprob(self, token: int, logits: torch.Tensor, top: int, offset: int) -> TokenLogprob:
        lp = torch.log_softmax(logits.float(), -1)
        best = {}
        if top > 0:
            values, ids = lp.topk(top)
            best = {self._piece(i): v for v, i in zip(values.tolist(), ids.tolist())}
        return TokenLogprob(self._piece(token), float(lp[token]), best if top > 0 else None, offset)

    def _piece(self, token: int) -> str:
        return "" if token == self.eos_id else self.tok.id_to_piece(token).replace("\u2581", " ")

    def _free_row(self, b: int, why: str) -> None:
        del self._rows[b]
        self._free.append(b)
        self.counts[why] += 1

    def _fail_all(self, message: str) -> None:
        for b, row in list(self._rows.items()):
            _send(row.job, Event(index=row.job.index, error=message))
            self._free_row(b, "failed")


def _plain_greedy(job: Job) -> bool:
    return job.sampler.greedy and job.logprobs is None


def _send(job: Job, event: Event) -> None:
    """Hand ``event`` to the request; one whose listener is gone is cancelled instead."""
    try:
        job.emit(event)
    except Exception:
        job.cancel()
