"""Load test for `pldr serve`: N concurrent streaming clients for a bounded time; prints one JSON report.

  pldr serve runs/qs/run/final --gcache runs/qs/gcache.safetensors --max-batch 16 &
  python examples/serve_load.py --clients 16 --duration 20 --max-tokens 64

Each client sends one completion after another (streamed, greedy unless --temperature) until the time
is up; the clients are spread over several processes (--processes), so that parsing the streams is not
what limits the figures. Reported: requests/s and tokens/s over the run, p50/p99 latency (request to
last token) and time to first token. Needs httpx (comes with the `serve` extra's openai client, or pip install httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time

import httpx


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def one_request(client: httpx.AsyncClient, body: dict, stats: dict) -> None:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            stats["errors"] += 1
            stats["last_error"] = r.text[:300]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                stats["errors"] += 1
                stats["last_error"] = chunk["error"]["message"]
                return
            for choice in chunk.get("choices", []):
                n = len(choice.get("token_ids", [])) or 1
                tokens += n
                if first is None:
                    first = time.perf_counter() - t0
    stats["latency"].append(time.perf_counter() - t0)
    stats["ttft"].append(first if first is not None else time.perf_counter() - t0)
    stats["tokens"] += tokens


async def client_loop(client, body, stats, stop_at: float) -> None:
    while time.perf_counter() < stop_at:
        try:
            await one_request(client, body, stats)
        except httpx.HTTPError as exc:
            stats["errors"] += 1
            stats["last_error"] = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)


async def run_clients(args, clients: int, model: str, start_at: float) -> dict:
    """``clients`` concurrent clients on one event loop from wall-clock time ``start_at``; their raw
    figures."""
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=args.url, headers=headers(args), limits=limits,
                                 timeout=args.timeout) as client:
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True}
        stats = {"latency": [], "ttft": [], "tokens": 0, "errors": 0}
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client, body, stats, t0 + args.duration) for _ in range(clients)))
        stats["elapsed"] = time.perf_counter() - t0
    return stats


def _worker(args, clients: int, model: str, start_at: float) -> dict:
    return asyncio.run(run_clients(args, clients, model, start_at))


def headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def first_model(args) -> str:
    r = httpx.get(f"{args.url}/v1/models", headers=headers(args), timeout=args.timeout)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run(args) -> dict:
    """The clients spread over ``args.processes`` processes (one Python process parses only so many
    streams a second: the load must not be what is measured), their figures merged."""
    model = args.model or first_model(args)
    shares = [args.clients // args.processes + (i < args.clients % args.processes) for i in range(args.processes)]
    if args.processes == 1:
        parts = [_worker(args, shares[0], model, time.time())]
    else:  # every process starts its clients at one moment, once all have started up
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.processes) as pool:
            start_at = time.time() + 2.0 + 0.5 * args.processes
            parts = pool.starmap(_worker, [(args, n, model, start_at) for n in shares])
    stats = {"latency": [], "ttft": [], "tokens": 0, "errors": 0}
    for part in parts:
        for key in ("latency", "ttft"):
            stats[key] += part[key]
        stats["tokens"] += part["tokens"]
        stats["errors"] += part["errors"]
        if "last_error" in part:
            stats["last_error"] = part["last_error"]
    elapsed = max(part["elapsed"] for part in parts)

    def ms(values, q):
        v = percentile(values, q)
        return None if v is None else round(v * 1e3, 2)

    report = {
        "url": args.url, "model": model, "clients": args.clients, "processes": args.processes,
        "max_tokens": args.max_tokens,
        "duration_s": round(elapsed, 3), "requests": len(stats["latency"]), "errors": stats["errors"],
        "tokens": stats["tokens"],
        "requests_per_s": round(len(stats["latency"]) / elapsed, 3),
        "tokens_per_s": round(stats["tokens"] / elapsed, 2),
        "latency_ms": {"p50": ms(stats["latency"], 50), "p99": ms(stats["latency"], 99)},
        "ttft_ms": {"p50": ms(stats["ttft"], 50), "p99": ms(stats["ttft"], 99)},
    }
    if "last_error" in stats:
        report["last_error"] = stats["last_error"]
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server root (default %(default)s).")
    p.add_argument("--model", default=None, help="Model id (default: the first of /v1/models).")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    p.add_argument("--duration", type=float, default=10.0, help="Seconds to keep sending.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompt", default="To be, or not to be")
    p.add_argument("--timeout", type=float, default=120.0, help="Per-request timeout in seconds.")
    p.add_argument("--processes", type=int, default=None,
                   help="Client processes (default: one per 16 clients, at most the CPUs less one).")
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients must be >= 1 and --duration > 0")
    if args.processes is None:
        args.processes = max(1, min(-(-args.clients // 16), (os.cpu_count() or 2) - 1))
    if not 1 <= args.processes <= args.clients:
        p.error("--processes must be in 1..--clients")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
