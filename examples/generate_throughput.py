#!/usr/bin/env python
"""End-to-end decoding throughput: `pldr generate` on many prompts of mixed lengths, as the command
batches them, with a G-cache file, and the whole run's tokens/s from its --json output.

Writes OUT/prompts.txt (COUNT prompts of MIN..MAX tokens, cut from the embedded corpus with the
model's own tokenizer), exports OUT/gcache.safetensors unless --gcache is given, runs

    pldr generate MODEL --prompts-file OUT/prompts.txt --max-new-tokens N --gcache G --greedy --json

into OUT/generate.jsonl and prints total_tokens_per_s (model load excluded; compiling included, and
also given without it). Prompts longer than the model's context allows are cut to fit (said so).

    python examples/generate_throughput.py runs/qs/run/final --new-tokens 16 --device cpu  # quick start
    python examples/generate_throughput.py models/paper-110m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from pldr_core.checkpoint import load_config
from pldr_core.corpus import iter_embedded_documents
from pldr_core.prompts import encode_prompt, find_tokenizer


def corpus_words(limit: int = 200_000) -> list[str]:
    """The first ``limit`` words of the embedded corpus, whitespace folded (a prompt is one line)."""
    words: list[str] = []
    for doc in iter_embedded_documents():
        words += doc["text"].split()
        if len(words) >= limit:
            break
    return words[:limit]


def make_prompts(tok, count: int, shortest: int, longest: int, seed: int = 0) -> list[str]:
    """``count`` prompts whose lengths in tokens run evenly from ``shortest`` to ``longest`` (shuffled),
    each a run of corpus words from a random place, cut to its length."""
    rng = random.Random(seed)
    words = corpus_words()
    lengths = [round(shortest + (longest - shortest) * i / max(count - 1, 1)) for i in range(count)]
    rng.shuffle(lengths)
    prompts = []
    for n in lengths:
        start = rng.randrange(len(words) - 4 * n)
        ids = tok.encode(" ".join(words[start:start + 4 * n]), eos=False)[:n]
        text = tok.decode(ids)
        while len(encode_prompt(tok, text)) > n:  # decoding then encoding may merge pieces anew
            ids = ids[:-1]
            text = tok.decode(ids)
        prompts.append(text)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="model directory")
    ap.add_argument("--gcache", type=Path, help="G-cache file (default: exported from the EOS prompt)")
    ap.add_argument("--count", type=int, default=64, help="prompts")
    ap.add_argument("--min-tokens", type=int, default=8, help="shortest prompt, in tokens")
    ap.add_argument("--max-tokens", type=int, default=200, help="longest prompt, in tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="--max-new-tokens of each prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the GPU figure)")
    ap.add_argument("--torch-compile", action="store_true", help="pass --torch-compile to pldr generate")
    ap.add_argument("--out", type=Path, help="folder for the prompts, G-cache and JSON (default: temporary)")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="pldr-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    context = load_config(args.model).max_seq_len
    longest = min(args.max_tokens, context - args.new_tokens)
    if longest < args.min_tokens:
        sys.exit(f"--new-tokens {args.new_tokens} leaves no room for a {args.min_tokens}-token prompt in "
                 f"the model's context of {context}")
    if longest < args.max_tokens:
        print(f"prompts cut to at most {longest} tokens: the model's context is {context}")
    tok = find_tokenizer(args.model)
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(make_prompts(tok, args.count, args.min_tokens, longest)) + "\n")
    pldr = [sys.executable, "-m", "pldr_cli"]
    gcache = args.gcache
    if gcache is None:
        gcache = out / "gcache.safetensors"
        subprocess.run([*pldr, "export-gcache", str(args.model), "--out", str(gcache)], check=True,
                       stdout=subprocess.DEVNULL)
    jsonl = out / "generate.jsonl"
    with jsonl.open("w") as fh:
        subprocess.run([*pldr, "generate", str(args.model), "--prompts-file", str(prompts_file),
                        "--max-new-tokens", str(args.new_tokens), "--gcache", str(gcache), "--greedy",
                        "--device", args.device, "--dtype", args.dtype, "--json",
                        *(["--torch-compile"] if args.torch_compile else [])], check=True, stdout=fh)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    lengths = [len(r["prompt_tokens"]) for r in rows]
    total = {k: rows[0][k] for k in ("total_new_tokens", "total_seconds", "total_tokens_per_s",
                                     "total_tokens_per_s_excluding_compile")}
    summary = {"prompts": len(rows), "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
               "max_new_tokens": args.new_tokens, "compile_s": rows[0]["compile_s"],
               "prefill_ms": rows[0]["prefill_ms"], "decode_ms": max(r["decode_ms"] for r in rows),
               "batch_decode_tokens_per_s": rows[0]["batch_decode_tokens_per_s"], **total,
               "jsonl": str(jsonl)}
    print(json.dumps(summary, indent=2))
    print(f"total_tokens_per_s {total['total_tokens_per_s']}")


if __name__ == "__main__":
    main()
