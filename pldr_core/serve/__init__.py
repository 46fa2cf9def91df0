"""``pldr serve``: continuous batching (``scheduler``, plain torch) behind an OpenAI-shaped HTTP API
(``server``, needs the ``serve`` extra: fastapi and uvicorn)."""

from __future__ import annotations

from pldr_core.errors import PLDRError
from pldr_core.prompts import find_tokenizer, load_for_generation
from pldr_core.serve.scheduler import EagerStep, Scheduler


def load_scheduler(model_path, *, max_batch: int, gcache=None, force: bool = False, tokenizer=None,
                   device=None, dtype=None):
    """Load a model (and its G-cache file) for serving: (Scheduler, Tokenizer, model).

    The rows' KV-cache spans the model's whole context, so any prompt + max_tokens that fits the
    model fits a row."""
    if max_batch < 1:
        raise PLDRError(f"--max-batch must be >= 1, got {max_batch}")
    tok = find_tokenizer(model_path, tokenizer)
    model, gc = load_for_generation(model_path, device=device, dtype=dtype, gcache=gcache, force=force)
    if tok.vocab_size > model.config.vocab_size:
        raise PLDRError(f"the tokenizer has {tok.vocab_size} pieces but the model only "
                        f"{model.config.vocab_size}")
    step = EagerStep(model.eval(), batch=max_batch, max_len=model.config.max_seq_len, g_cache=gc)
    return Scheduler(step, tok, eos_id=model.config.eos_id), tok, model
