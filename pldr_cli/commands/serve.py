"""pldr serve: an OpenAI-compatible completions server with continuous batching."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import fail, handle_errors

EPILOG = """Examples:

  pldr serve runs/qs/run/final --gcache runs/qs/gcache.safetensors --port 8000

  pldr serve MODEL --gcache G.safetensors --max-batch 64 --max-len 512   # 64 rows of 512 positions (GPU)

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "runs/qs/run/final", "prompt": "To be, or not to be", "max_tokens": 24, "temperature": 0}'

Endpoints: GET /v1/models, POST /v1/completions (prompt a string, a list of strings or token ids; max_tokens, temperature, top_p, top_k, seed, stop, stream, logprobs), GET /health, GET /metrics (Prometheus text). The model id is MODEL as given (or --name). Up to --max-batch prompts decode together; a new one takes the first free row between decode steps, so a short request never waits for a long one. While every row decodes greedily without logprobs, the static engine runs --chunk-steps steps per launch with the tokens chosen and fed back on the GPU, and the host reads them back one chunk behind, while the next chunk runs; a sampled or logprobs request turns the batch to single steps until it is done. With --gcache the metric path never runs; without it each prompt's G_LM comes from its own prefill (the response's "pldr" field says which)."""


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=EPILOG, help="Serve a model over an OpenAI-compatible HTTP API.")(serve)


@handle_errors
def serve(
    model: Path = typer.Argument(..., help="Model directory (ours or HF pldrllm) or reference .pth."),
    gcache: Path = typer.Option(None, "--gcache", help="G-cache file: the metric path never runs."),
    force: bool = typer.Option(False, "--force", help="Accept a G-cache made from another model of "
                               "the same shape."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model (default: the model "
                                   "directory's tokenizer.model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(8, "--max-batch", help="Rows decoded together; more requests queue."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="The largest max_tokens a request "
                                       "may ask for."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64."),
    api_key: str = typer.Option(None, "--api-key", envvar="PLDR_API_KEY", help="Require "
                                "'Authorization: Bearer KEY' on /v1 (also from $PLDR_API_KEY)."),
    name: str = typer.Option(None, "--name", help="Model id clients name (default: MODEL as given)."),
    engine: str = typer.Option("auto", "--engine", help="static: the static-cache engine, one compiled "
                               "step (a CUDA graph) for all rows; eager: the model's cached forward; "
                               "auto: static on a GPU, eager elsewhere."),
    stream_interval: float = typer.Option(20.0, "--stream-interval", help="Milliseconds a stream waits "
                                          "between chunks, gathering tokens (0: a chunk per token; the "
                                          "first chunk is always sent at once)."),
    max_len: int = typer.Option(None, "--max-len", help="Positions a row holds, prompt + max_tokens "
                                "(default: the model's context). Smaller is faster on the static engine."),
    chunk_steps: int = typer.Option(8, "--chunk-steps", help="Greedy steps the static engine runs per "
                                    "launch while every row decodes greedily without logprobs, tokens "
                                    "fed back on the device (0: one step at a time)."),
) -> None:
    from pldr_core.checkpoint import load_config
    from pldr_core.device import resolve_dtype

    config = load_config(model)
    resolve_dtype(dtype)
    if max_new_tokens < 1 or max_new_tokens >= config.max_seq_len:
        raise fail(f"--max-new-tokens must be in 1..{config.max_seq_len - 1} (the model's context is "
                   f"{config.max_seq_len}), got {max_new_tokens}")
    if max_batch < 1:
        raise fail(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 < port < 65536:
        raise fail(f"--port must be in 1..65535, got {port}")
    try:
        import uvicorn

        from pldr_core.serve.server import create_app
    except ModuleNotFoundError as exc:
        raise fail(f"pldr serve needs {exc.name}: pip install 'pldr[serve]'") from None
    from pldr_core.serve import load_scheduler

    if not 0 <= stream_interval <= 10_000:
        raise fail(f"--stream-interval must be in 0..10000 ms, got {stream_interval}")
    if max_len is not None and not 2 <= max_len <= config.max_seq_len:
        raise fail(f"--max-len must be in 2..{config.max_seq_len} (the model's context), got {max_len}")
    if not 0 <= chunk_steps <= 256:
        raise fail(f"--chunk-steps must be in 0..256, got {chunk_steps}")
    if max_len is not None and max_new_tokens >= max_len:
        max_new_tokens = max_len - 1
    typer.echo("loading the model (on a GPU the static engine compiles its step first)", err=True)
    scheduler, tok, net = load_scheduler(model, max_batch=max_batch, gcache=gcache, force=force,
                                         tokenizer=tokenizer, device=device, dtype=dtype, engine=engine,
                                         max_len=max_len, chunk=chunk_steps)
    app = create_app(scheduler, model_id=name or str(model).rstrip("/"), tokenizer=tok,
                     vocab_size=net.config.vocab_size, max_new_tokens=max_new_tokens, api_key=api_key,
                     stream_interval=stream_interval / 1e3)
    typer.echo(f"serving {name or model} on http://{host}:{port}/v1 ({max_batch} rows, G from "
               f"{scheduler.step.g_source}, {scheduler.step.name} step)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
