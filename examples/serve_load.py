"""Load test for `pldr serve`: N concurrent streaming clients for a bounded time; prints one JSON report.

  pldr serve runs/qs/run/final --gcache runs/qs/gcache.safetensors --max-batch 16 &
  python examples/serve_load.py --clients 16 --duration 20 --max-tokens 64

Each client sends one completion after another (streamed, greedy unless --temperature) until the time
is up. Reported: requests/s and tokens/s over the run, p50/p99 latency (request to last token) and
time to first token. Needs httpx (comes with the `serve` extra's openai client, or pip install httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True}
        stats = {"latency": [], "ttft": [], "tokens": 0, "errors": 0}
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client, body, stats, t0 + args.duration)
                               for _ in range(args.clients)))
        elapsed = time.perf_counter() - t0

    def ms(values, q):
        v = percentile(values, q)
        return None if v is None else round(v * 1e3, 2)

    report = {
        "url": args.url, "model": model, "clients": args.clients, "max_tokens": args.max_tokens,
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
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients must be >= 1 and --duration > 0")
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
