"""``pldr serve``: continuous batching (``scheduler`` over a decode step of ``steps``, plain torch) behind
an OpenAI-shaped HTTP API (``server``, needs the ``serve`` extra: fastapi and uvicorn)."""

from __future__ import annotations

from pldr_core.errors import PLDRError
from pldr_core.prompts import find_tokenizer, load_for_generation
from pldr_core.serve.scheduler import Scheduler
from pldr_core.serve.steps import EagerStep, EngineStep

ENGINES = ("auto", "eager", "static")


def load_scheduler(model_path, *, max_batch: int, gcache=None, force: bool = False, tokenizer=None,
                   device=None, dtype=None, engine: str = "auto", max_len: int | None = None,
                   chunk: int = 8):
    """Load a model (and its G-cache file) for serving: (Scheduler, Tokenizer, model).

    ``engine``: 'static' (the static-cache engine: compiled, one CUDA graph per step, on a GPU),
    'eager' (the model's cached forward) or 'auto' (static on a GPU, eager elsewhere). ``max_len``:
    positions per row (prompt + max_tokens; default the model's whole context). ``chunk``: greedy
    steps per launch of the static engine while every row decodes greedily (0: single steps)."""
    if max_batch < 1:
        raise PLDRError(f"--max-batch must be >= 1, got {max_batch}")
    if engine not in ENGINES:
        raise PLDRError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if chunk < 0:
        raise PLDRError(f"--chunk-steps must be >= 0, got {chunk}")
    tok = find_tokenizer(model_path, tokenizer)
    model, gc = load_for_generation(model_path, device=device, dtype=dtype, gcache=gcache, force=force)
    if tok.vocab_size > model.config.vocab_size:
        raise PLDRError(f"the tokenizer has {tok.vocab_size} pieces but the model only "
                        f"{model.config.vocab_size}")
    context = model.config.max_seq_len
    if max_len is None:
        max_len = context
    if not 2 <= max_len <= context:
        raise PLDRError(f"--max-len must be in 2..{context} (the model's context), got {max_len}")
    model.eval()
    cuda = next(model.parameters()).is_cuda
    if engine == "static" or (engine == "auto" and cuda):
        step = EngineStep(model, batch=max_batch, max_len=max_len, g_cache=gc, compile=cuda, chunk=chunk)
    else:
        step = EagerStep(model, batch=max_batch, max_len=max_len, g_cache=gc)
    return Scheduler(step, tok, eos_id=model.config.eos_id), tok, model
