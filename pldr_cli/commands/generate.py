"""pldr generate: sample or greedy-decode text, with KV-cache and G-cache each switchable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, is_terminal

EPILOG = """Examples:

  pldr generate runs/tiny/final --prompt "the metric tensor" --max-new-tokens 40 --seed 1

  pldr generate runs/small/final --prompt "once upon a time" --gcache g-eos.safetensors --greedy

  pldr generate runs/small/final --prompts-file prompts.txt --greedy --json > out.jsonl

  pldr generate runs/small/final --prompt "hello" --no-kv-cache --no-g-cache

  pldr generate runs/small/final -p "hello" --gcache g-eos.safetensors --device cuda --compile

With --gcache FILE (from `pldr export-gcache`) the metric path never runs, not even at prefill, and the command also reports how far that G-cache moves the prompt's logits from full PLGA (max |logit diff| and greedy next-token agreement): the paper's claim, measured. Several prompts are decoded together as one batch; each gets the tokens it gets alone. --json prints one JSON object per prompt per line; the whole run's totals (total_new_tokens, total_seconds, total_tokens_per_s) are in every one.

--compile (default on CUDA with the KV-cache) decodes through a static-cache engine whose step is captured once as a CUDA graph and replayed for every token, with the same tokens as eager decoding; --torch-compile also compiles that step with torch.compile first (seconds of compiling, so only worth it for long runs). The one-off capture and compile time is reported apart (compile_s). On CPU --compile runs the same engine without a graph (no speed-up expected); with --no-kv-cache it is ignored."""


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
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="Static-cache engine, its step "
                                  "replayed as a CUDA graph on CUDA. Default: on for CUDA with the KV-cache, off "
                                  "on CPU (there it runs uncompiled). Ignored with --no-kv-cache."),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="Also compile the static engine's "
                                       "step with torch.compile (CUDA only): seconds up front, for long runs."),
) -> None:
    from pldr_core.generation import GenerationRequest, RowDone, Started, TextDelta, run_generation

    request = GenerationRequest(
        model=model, texts=list(prompt or []), prompts_file=prompts_file, token_prompts=list(tokens or []),
        tokenizer=tokenizer, gcache=gcache, force=force, kv_cache=kv_cache, g_cache=g_cache,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
        greedy=greedy, seed=seed, device=device, dtype=dtype, compile=compile_, torch_compile=torch_compile,
        stream=False if as_json else stream)
    out = sys.stdout
    labels, stream_on = [], False
    for event in run_generation(request):
        if isinstance(event, Started):
            labels, stream_on = event.labels, event.stream
            if stream_on and len(labels) == 1:
                out.write(labels[0])
                out.flush()
        elif isinstance(event, TextDelta):
            out.write(event.text)
            out.flush()
        elif isinstance(event, RowDone):
            if stream_on and len(labels) == 1:
                out.write("\n")
                out.flush()
            elif stream_on:
                _print_block(out, event.row, event.prompt, event.text)
        else:
            result = event
    if as_json:
        for row in result.records:
            out.write(json.dumps(row) + "\n")
        return
    if not stream_on:
        for b, row in enumerate(result.records):
            _print_block(out, b, row["prompt"], row["text"], numbered=len(result.records) > 1)
    _summary(result)


def _print_block(out, row: int, prompt: str, text: str, numbered: bool = True) -> None:
    if numbered:
        out.write(f"[{row}] {prompt}{text}\n")
    else:
        out.write(f"{prompt}{text}\n")
    out.flush()


def _summary(result) -> None:
    """Timing and, with a G-cache file, its fidelity against full PLGA; on stderr (stdout is the text)."""
    c = console(stderr=True)
    rich = is_terminal()
    results, batch_rate = result.records, result.batch_decode_tokens_per_s
    for b, row in enumerate(results):
        rate = row["decode_tokens_per_s"]
        tag = f"[{b}] " if len(results) > 1 else ""
        line = (f"{tag}{len(row['new_tokens'])} new tokens ({row['finish_reason']}), prefill "
                f"{row['prefill_ms']:.1f} ms, decode {'-' if rate is None else f'{rate:.1f}'} tokens/s, "
                f"kv-cache {'on' if row['kv_cache'] else 'off'}, g-cache {row['g_cache']}")
        if row["compile"]:
            line += ", static engine"
            if row["compile_s"]:
                line += f" (set up in {row['compile_s']:.1f} s)"
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
    msgs = []
    if len(results) > 1 and batch_rate is not None:
        msgs.append(f"batch of {len(results)}: decode {batch_rate:.1f} tokens/s")
    if result.total_tokens_per_s is not None:
        msgs.append(f"total: {result.total_new_tokens} new tokens in {result.total_seconds:.2f} s, "
                    f"{result.total_tokens_per_s:.1f} tokens/s (prefill and compiling included, "
                    f"{result.compile_s:.1f} s of it compiling; model load excluded)")
    for msg in msgs:
        c.print(msg, style="dim") if rich else print(msg, file=sys.stderr)
