"""pldr generate: sample or greedy-decode text, with KV-cache and G-cache each switchable (SPEC 2, 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from pldr_cli._common import console, fail, handle_errors, is_terminal

EPILOG = """Examples:

  pldr generate runs/tiny/final --prompt "the metric tensor" --max-new-tokens 40 --seed 1

  pldr generate runs/small/final --prompt "once upon a time" --gcache g-eos.safetensors --greedy

  pldr generate runs/small/final --prompts-file prompts.txt --greedy --json > out.jsonl

  pldr generate runs/small/final --prompt "hello" --no-kv-cache --no-g-cache

  pldr generate runs/small/final -p "hello" --gcache g-eos.safetensors --device cuda --compile

With --gcache FILE (from `pldr export-gcache`) the metric path never runs, not even at prefill, and the command also reports how far that G-cache moves the prompt's logits from full PLGA (max |logit diff| and greedy next-token agreement): the paper's claim, measured. Several prompts are decoded together as one batch; each gets the tokens it gets alone. --json prints one JSON object per prompt per line.

--compile (default on CUDA with the KV-cache) decodes through a static-cache engine whose step is compiled with torch.compile and replayed as a CUDA graph: measured on an H200 at about 2,450 tokens/s at batch 1 with a G-cache file, against about 150-190 tokens/s for eager decoding, with the same greedy tokens. The one-off compile time is reported apart (compile_s). On CPU --compile runs the same engine without torch.compile (no speed-up expected); with --no-kv-cache it is ignored."""


def register(app: typer.Typer) -> None:
    app.command("generate", epilog=EPILOG, help="Generate text from prompts (KV/G caches switchable).")(
        generate)


@handle_errors
def generate(
    model: Path = typer.Argument(..., help="Model directory (ours or HF pldrllm) or reference .pth."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (repeatable; \"\" = "
                                     "start a new document)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="Text file, one prompt per line."),
    tokens: list[str] = typer.Option(None, "--tokens", help="A prompt as raw ids, e.g. '5,6,7' "
                                     "(repeatable)."),
    gcache: Path = typer.Option(None, "--gcache", help="G-cache file: the metric path never runs."),
    force: bool = typer.Option(False, "--force", help="Accept a G-cache made from another model of "
                               "the same shape."),
    kv_cache: bool = typer.Option(True, "--kv-cache/--no-kv-cache", help="Cache keys/values (A frozen "
                                  "at the prompt)."),
    g_cache: bool = typer.Option(True, "--g-cache/--no-g-cache", help="Reuse G_LM from the prefill "
                                 "(or --gcache) instead of rerunning the metric path."),
    max_new_tokens: int = typer.Option(50, "--max-new-tokens", "-n", help="Stop after this many new "
                                       "tokens (or at EOS)."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature (0 = "
                                      "greedy)."),
    top_k: int = typer.Option(50, "--top-k", help="Sample from the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Print text as it is produced "
                                "(default: on for a single prompt without --json)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt per line."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model (default: the "
                                   "model directory's tokenizer.model)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64."),
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="Static-cache engine, compiled "
                                  "with CUDA graphs on CUDA (H200, batch 1, G-cache file: ~2,450 vs "
                                  "~150-190 tokens/s eager). Default: on for CUDA with the KV-cache, off "
                                  "on CPU (there it runs uncompiled). Ignored with --no-kv-cache."),
) -> None:
    from pldr_core.checkpoint import load_config
    from pldr_core.sampling import Sampler
    from pldr_core.generate import (GenerationStats, continuation_text, encode_prompt,
                                    find_tokenizer, gcache_fidelity, load_for_generation,
                                    parse_token_ids, read_prompts_file)
    from pldr_core.device import resolve_dtype
    from pldr_core.generate import generate as run_generate

    # ---- validate everything before loading weights --------------------------------------------
    config = load_config(model)  # also refuses a path that is no model
    resolve_dtype(dtype)
    if gcache is not None and not g_cache:
        raise fail("--gcache and --no-g-cache contradict each other; drop one")
    if max_new_tokens < 1:
        raise fail(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sampler = Sampler(temperature=temperature, top_k=top_k or None, top_p=top_p, greedy=greedy,
                      seed=seed)
    texts = list(prompt or [])
    if prompts_file is not None:
        texts += read_prompts_file(prompts_file)
    if not texts and not tokens:
        raise fail("give a prompt: --prompt TEXT, --prompts-file FILE or --tokens IDS "
                   "(--prompt \"\" starts a new document)")
    tok = find_tokenizer(model, tokenizer) if (texts or tokenizer is not None) else None
    if tok is None:
        tok = _maybe_tokenizer(model)
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise fail(f"the tokenizer has {tok.vocab_size} pieces but the model only {config.vocab_size}")
    prompts, labels = [], []
    for text in texts:
        prompts.append(encode_prompt(tok, text))
        labels.append(text)
    for spec in tokens or []:
        ids = parse_token_ids(spec, config.vocab_size)
        prompts.append(ids)
        labels.append(tok.decode(ids) if tok is not None else f"[{spec}]")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise fail(f"prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                   f"context of {config.max_seq_len}; shorten one of them")

    # ---- run -----------------------------------------------------------------------------------
    net, gc = load_for_generation(model, device=device, dtype=dtype, gcache=gcache, force=force)
    has_metric = net.config.has_metric_path
    g_state = ("file" if gc is not None else "prefill" if g_cache else "off") if has_metric else "n/a"
    g_arg = gc if gc is not None else g_cache
    on_cuda = next(net.parameters()).device.type == "cuda"
    use_compile = kv_cache and (on_cuda if compile_ is None else compile_)
    if stream is None:
        stream = len(prompts) == 1 and not as_json
    stream = stream and not as_json
    single_stream = stream and len(prompts) == 1

    new_ids: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    stats = GenerationStats(rows=[])
    out = sys.stdout
    printed = ""
    if single_stream:
        out.write(labels[0])
        out.flush()
    for t in run_generate(net, prompts, max_new_tokens=max_new_tokens, kv_cache=kv_cache,
                          g_cache=g_arg, sampler=sampler, eos_id=net.config.eos_id, stats=stats,
                          compile=use_compile):
        new_ids[t.row].append(t.id)
        if t.done:
            finish[t.row] = t.finish_reason
        if single_stream and tok is not None:
            text = continuation_text(tok, prompts[0], new_ids[0]).rstrip("\ufffd")
            if text.startswith(printed) and len(text) > len(printed):
                out.write(text[len(printed):])
                out.flush()
                printed = text
        elif stream and not single_stream and t.done:
            _print_block(out, t.row, labels[t.row], _text(tok, prompts[t.row], new_ids[t.row]))
    if single_stream:
        final = _text(tok, prompts[0], new_ids[0])
        # what was held back (a trailing partial UTF-8 piece) or, without a tokenizer, the ids
        out.write(final[len(printed):] if final.startswith(printed) else final)
        out.write("\n")
        out.flush()

    results = []
    for b, ids in enumerate(prompts):
        timing = stats.rows[b]
        rate = timing.decode_tokens_per_s
        row = {
            "prompt": labels[b],
            "prompt_tokens": ids,
            "text": _text(tok, ids, new_ids[b]),
            "tokens": ids + new_ids[b],
            "new_tokens": new_ids[b],
            "finish_reason": finish[b],
            "prefill_ms": round(timing.prefill_ms, 3),
            "decode_ms": round(timing.decode_s * 1e3, 3),
            "decode_tokens_per_s": None if rate is None else round(rate, 2),
            "kv_cache": kv_cache,
            "g_cache": g_state,
            "compile": use_compile,
            "compile_s": round(stats.compile_s, 3),
            "sampling": "greedy" if sampler.greedy else {"temperature": temperature, "top_k": top_k or None,
                                                         "top_p": top_p, "seed": seed},
        }
        if gc is not None:
            row["gcache"] = str(gcache)
            row["gcache_fidelity"] = gcache_fidelity(net, ids, gc)
        results.append(row)
    batch_rate = stats.decode_tokens_per_s

    if as_json:
        for row in results:
            row["batch_size"] = len(prompts)
            row["batch_decode_tokens_per_s"] = None if batch_rate is None else round(batch_rate, 2)
            out.write(json.dumps(row) + "\n")
        return
    if not stream:
        for b, row in enumerate(results):
            _print_block(out, b, row["prompt"], row["text"], numbered=len(results) > 1)
    _summary(results, batch_rate)


def _maybe_tokenizer(model: Path):
    from pldr_core.errors import PLDRError
    from pldr_core.generate import find_tokenizer

    try:
        return find_tokenizer(model)
    except PLDRError:
        return None


def _text(tok, prompt_ids, new_ids) -> str:
    if tok is None:  # raw ids in, raw ids out
        return " " + " ".join(map(str, new_ids))
    from pldr_core.generate import continuation_text

    return continuation_text(tok, prompt_ids, new_ids)


def _print_block(out, row: int, prompt: str, text: str, numbered: bool = True) -> None:
    if numbered:
        out.write(f"[{row}] {prompt}{text}\n")
    else:
        out.write(f"{prompt}{text}\n")
    out.flush()


def _summary(results: list[dict], batch_rate) -> None:
    """Timing and, with a G-cache file, its fidelity against full PLGA; on stderr (stdout is the text)."""
    c = console(stderr=True)
    rich = is_terminal()
    for b, row in enumerate(results):
        rate = row["decode_tokens_per_s"]
        tag = f"[{b}] " if len(results) > 1 else ""
        line = (f"{tag}{len(row['new_tokens'])} new tokens ({row['finish_reason']}), prefill "
                f"{row['prefill_ms']:.1f} ms, decode {'-' if rate is None else f'{rate:.1f}'} tokens/s, "
                f"kv-cache {'on' if row['kv_cache'] else 'off'}, g-cache {row['g_cache']}")
        if row["compile"]:
            line += ", static engine"
            if row["compile_s"]:
                line += f" (compiled in {row['compile_s']:.1f} s)"
        fid = row.get("gcache_fidelity")
        if fid is not None:
            line += (f"\n{tag}G-cache vs full PLGA on this prompt: max |logit diff| "
                     f"{fid['max_abs_logit_diff_last']:.4g} at the last position "
                     f"({fid['max_abs_logit_diff']:.4g} over {fid['positions']} positions; logits up to "
                     f"{fid['logit_scale']:.3g}), next token {'agrees' if fid['next_token_agrees'] else 'differs'}, "
                     f"greedy agreement {100 * fid['argmax_agreement']:.1f}% of positions")
        if rich:
            c.print(line, style="dim")
        else:
            print(line, file=sys.stderr)
    if len(results) > 1 and batch_rate is not None:
        msg = f"batch of {len(results)}: decode {batch_rate:.1f} tokens/s"
        c.print(msg, style="dim") if rich else print(msg, file=sys.stderr)
