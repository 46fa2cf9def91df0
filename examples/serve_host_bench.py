#!/usr/bin/env python
"""The serving host path without a model: how many tokens/s the scheduler (and the HTTP server on top)
can hand out when the decode step costs only what --step-ms says.

A stand-in for the static engine's step returns random plain pieces of TOKENIZER after sleeping
--step-ms per step (the GPU's time; 0 for the host's bare ceiling), so what is measured is the rest:
admitting rows, turning tokens into text, events, and with --http the server, its streams and the
load script's clients (examples/serve_load.py, 127.0.0.1 only). Compare --chunk 8 with --chunk 0
(one step at a time) side by side on one machine.

    python examples/serve_host_bench.py data/tok32k/tokenizer.model --chunk 8
    python examples/serve_host_bench.py data/tok32k/tokenizer.model --chunk 0 --step-ms 0.4 --http --processes 2
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from pldr_core.sampling import Sampler
from pldr_core.serve.scheduler import Job, Scheduler
from pldr_core.tokenizer import Tokenizer


class StandInStep:
    """A ``DecodeStep`` that sleeps instead of running a model and picks random plain pieces."""

    name, g_source, device = "stand-in", "file", torch.device("cpu")
    WIDTH = 1024

    def __init__(self, tok: Tokenizer, *, batch: int, max_len: int, chunk: int, step_s: float):
        sp = tok.sp
        # Pieces below WIDTH only, so that single steps' logits [B, WIDTH] cost the host next to nothing
        # (a real step's logits stay on the GPU): both paths then pay only for the serving around them.
        self.pieces = [i for i in range(min(self.WIDTH, tok.vocab_size))
                       if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i))]
        self.vocab = min(self.WIDTH, tok.vocab_size)
        self.batch, self.max_len, self.chunk, self.step_s = batch, max_len, chunk, step_s
        self.rng = random.Random(0)

    def _logits(self, rows: int) -> torch.Tensor:
        logits = torch.zeros(rows, self.vocab)
        logits[torch.arange(rows), torch.tensor([self.rng.choice(self.pieces) for _ in range(rows)])] = 1
        return logits

    def prefill_rows(self, rows, prompts):
        return self._logits(len(rows))

    def step(self, tokens, positions):
        time.sleep(self.step_s)
        return self._logits(self.batch)

    def start_rows(self, rows, prompts):
        return Values([self.rng.choice(self.pieces) for _ in rows])

    def set_inputs(self, tokens, positions):
        pass

    def launch(self):
        time.sleep(self.step_s * self.chunk)
        return Values([[self.rng.choice(self.pieces) for _ in range(self.chunk + 1)] for _ in range(self.batch)])


class Values:
    """What ``Readback`` gives the scheduler, already on the host."""

    def __init__(self, values: list):
        self._values = values

    def values(self) -> list:
        return self._values


def scheduler_only(scheduler: Scheduler, tok: Tokenizer, requests: int, max_tokens: int, prompt: str) -> dict:
    finished = threading.Semaphore(0)

    def emit(event):
        if event.finish_reason is not None:
            finished.release()

    ids = tok.encode(prompt, eos=False)
    scheduler.start()
    t0 = time.perf_counter()
    for _ in range(requests):
        scheduler.submit(Job(prompt=ids, max_tokens=max_tokens, sampler=Sampler(greedy=True), emit=emit))
    for _ in range(requests):
        finished.acquire()
    elapsed = time.perf_counter() - t0
    scheduler.stop()
    tokens = scheduler.counts["tokens"]
    return {"requests": requests, "tokens": tokens, "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1), "us_per_token": round(elapsed / tokens * 1e6, 3)}


def over_http(scheduler: Scheduler, tok: Tokenizer, args) -> dict:
    import uvicorn

    from pldr_core.serve.server import create_app

    app = create_app(scheduler, model_id="stand-in", tokenizer=tok, vocab_size=tok.vocab_size,
                     max_new_tokens=args.max_tokens)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        load = [sys.executable, str(Path(__file__).with_name("serve_load.py")), "--url", url,
                "--clients", str(args.clients), "--duration", str(args.duration),
                "--max-tokens", str(args.max_tokens), "--prompt", args.prompt]
        if args.processes:
            load += ["--processes", str(args.processes)]
        out = subprocess.run(load, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", type=Path, help="SentencePiece model (the text path depends on it)")
    ap.add_argument("--chunk", type=int, default=8, help="steps per launch (0: one step at a time)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="milliseconds one step stands for")
    ap.add_argument("--batch", type=int, default=64, help="rows")
    ap.add_argument("--requests", type=int, default=640, help="requests (without --http)")
    ap.add_argument("--max-tokens", type=int, default=240)
    ap.add_argument("--prompt", default="It is a truth universally acknowledged, that a single man")
    ap.add_argument("--http", action="store_true", help="through the server and serve_load.py instead")
    ap.add_argument("--clients", type=int, default=64, help="with --http")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of load, with --http")
    ap.add_argument("--processes", type=int, default=None, help="serve_load.py's --processes, with --http")
    args = ap.parse_args()
    if args.chunk < 0 or args.step_ms < 0 or args.batch < 1:
        sys.exit("--chunk and --step-ms must be >= 0 and --batch >= 1")
    tok = Tokenizer(args.tokenizer)
    step = StandInStep(tok, batch=args.batch, max_len=args.max_tokens + 64, chunk=args.chunk,
                       step_s=args.step_ms / 1e3)
    scheduler = Scheduler(step, tok, eos_id=tok.eos_id)
    report = over_http(scheduler, tok, args) if args.http else scheduler_only(
        scheduler, tok, args.requests, args.max_tokens, args.prompt)
    print(json.dumps({"chunk": args.chunk, "step_ms": args.step_ms, "batch": args.batch, **report}, indent=2))


if __name__ == "__main__":
    main()
