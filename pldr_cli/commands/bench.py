"""pldr bench: training and decoding speed, learned-G against identity-G, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, is_terminal

EPILOG = """Examples:

  pldr bench --preset tiny                       # CPU smoke run, well under a minute

  pldr bench all --preset paper-110m --json bench.json      # the full benchmark (GPU)

  pldr bench train --preset paper-110m --metric-precision fp32   # fp32 metric path, for comparison

  pldr bench train --preset paper-110m --batch 8 --seq-len 512 --no-compile

  pldr bench decode --preset small --decode-batch 32 --new-tokens 128

  pldr bench decode --preset paper-110m --repeats 15 --no-eager-decode   # steadier decode medians

  pldr bench decode --preset tiny --no-peer      # without the Hugging Face Llama peer
"""


def register(app: typer.Typer) -> None:
    app.command("bench", epilog=EPILOG,
                help="Measure training and decoding tokens/s (learned-G vs identity-G, all cache modes).")(bench)


@handle_errors
def bench(
    what: str = typer.Argument("all", help="train, decode or all."),
    preset: str = typer.Option("tiny", "--preset", "-p", help="Model shape: tiny, small or paper-110m."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_file: Path = typer.Option(None, "--json", help="Also write every figure to this JSON file."),
    batch: int = typer.Option(None, "--batch", help="Training batch (default 16 on GPU, 4 on CPU)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Training sequence length (default 1024 GPU, 64 CPU)."),
    steps: int = typer.Option(None, "--steps", help="Timed training steps (default 20 GPU, 3 CPU)."),
    compile: bool = typer.Option(None, "--compile/--no-compile",
                                 help="torch.compile training and the decode engine (default: on GPU)."),
    compile_mode: str = typer.Option(None, "--compile-mode", help="torch.compile mode for training: "
                                     "default, reduce-overhead (CUDA graphs; the default on CUDA), max-autotune-no-cudagraphs."),
    metric_precision: str = typer.Option("bf16", "--metric-precision",
                                         help="Learned-G training on CUDA: the metric path's GLU matmuls "
                                         "with bf16 operands (default, as pldr pretrain; the fastest), "
                                         "tf32 or fp32. All train like fp32 under bf16 autocast."),
    decode_batch: int = typer.Option(None, "--decode-batch", help="The larger decode batch (16 GPU, 4 CPU)."),
    prompt_len: int = typer.Option(None, "--prompt-len", help="Random prompt tokens (32 GPU, 8 CPU)."),
    new_tokens: int = typer.Option(None, "--new-tokens", help="Greedy new tokens (256 GPU, 16 CPU)."),
    eager_decode: bool = typer.Option(True, "--eager-decode/--no-eager-decode",
                                      help="Also time the eager decode_steps mechanism."),
    repeats: int = typer.Option(None, "--repeats", help="Timed runs of each decode engine, taken in "
                                "turns; each figure is their median (default 15 GPU, 2 CPU)."),
    peer: bool = typer.Option(True, "--peer/--no-peer", help="Also time a Hugging Face Llama of the same "
                              "shape on transformers' static cache (compiled when the engines are), in "
                              "the same turns; skipped where transformers is not installed."),
) -> None:
    from pldr_core.bench import WHATS, run_bench
    from pldr_core.errors import PLDRError

    if what not in WHATS:
        raise PLDRError(f"unknown benchmark {what!r}; choose one of {', '.join(WHATS)}")
    if json_file is not None and json_file.is_dir():
        raise PLDRError(f"--json {json_file} is a directory; give a file path")
    err = console(stderr=True)
    log = (lambda s: err.print(f"[dim]{s}[/dim]")) if is_terminal() else (lambda s: typer.echo(s, err=True))
    result = run_bench(what, preset=preset, device=device, batch=batch, seq_len=seq_len, steps=steps,
                       compile_mode=compile_mode, metric_precision=metric_precision,
                       compile=compile, decode_batch=decode_batch, prompt_len=prompt_len,
                       new_tokens=new_tokens, eager_decode=eager_decode, repeats=repeats, peer=peer,
                       log=log)
    if json_file is not None:
        from pldr_core.files import atomic_write_text

        atomic_write_text(json_file, json.dumps(result, indent=2) + "\n")
    _render(result)


def _fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def _render(result: dict) -> None:
    c = console()
    c.print(f"device {result['device']}, torch {result['torch']}, preset {result['preset']}")
    if "train" in result:
        t = result["train"]
        c.print(f"train: batch {t['batch']} x {t['seq_len']}, {t['steps']} steps, {t['dtype']}, "
                f"compile {t['compile']}, metric path {t['metric_precision']}")
        for g in ("learned", "identity"):
            r = t[g]
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            mem = f", peak {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
            c.print(f"  {g + '-G':11s} {_fmt(r['tokens_per_s'])} tokens/s  {r['step_ms']:.1f} ms/step  "
                    f"{r['tflops']:.1f} TFLOP/s  MFU {mfu}{mem}")
        c.print(f"  ratio learned/identity {t['ratio_learned_identity']:.3f}")
    if "decode" in result:
        d = result["decode"]
        c.print(f"decode: prompt {d['prompt_len']} + {d['new_tokens']} new tokens, greedy, {d['dtype']}, "
                f"engine compiled {d['compile']} (tokens/s; engine: median of {d['engine_repeats']} "
                f"interleaved runs)")
        for B in d["batches"]:
            row = d[f"batch_{B}"]
            for kind in ("eager", "engine"):
                if kind in row:
                    cells = "  ".join(f"{k} {_fmt(v['tokens_per_s'])}" for k, v in row[kind].items())
                    c.print(f"  batch {B:<3d} {kind:6s} {cells}")
            line = f"  batch {B:<3d} ratio gfile/identity: engine {row['ratio_gfile_identity']:.3f}"
            if "ratio_gfile_identity_eager" in row:
                line += f", eager {row['ratio_gfile_identity_eager']:.3f}"
            c.print(line)
            _render_peer(c, B, row)


def _render_peer(c, B: int, row: dict) -> None:
    peer = row.get("peer")
    if peer is None:
        return
    if "skipped" in peer:
        c.print(f"  batch {B:<3d} peer   skipped: {peer['skipped']}")
        return
    c.print(f"  batch {B:<3d} peer   {peer['name']} {_fmt(peer['tokens_per_s'])} "
            f"(transformers {peer['transformers']})")
    c.print(f"  batch {B:<3d} ratio ours/peer: identity-G {row['ratio_identity_peer']:.3f}, "
            f"G-cache file {row['ratio_gfile_peer']:.3f}")
