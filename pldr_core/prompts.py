"""From a model directory and the user's prompts to what decoding needs: the model's tokenizer,
prompt files, raw token ids, the encoded prompts, their decoded continuations and the loaded model
(with a G-cache file read and checked against it)."""

from __future__ import annotations

from pathlib import Path

from pldr_core.attention import metric_dtype
from pldr_core.cache import GCache
from pldr_core.checkpoint import load_model
from pldr_core.device import resolve_device, resolve_dtype
from pldr_core.errors import PLDRError
from pldr_core.files import read_text_lines
from pldr_core.gcache import read_gcache
from pldr_core.model import cast_for_inference
from pldr_core.tokenizer import TOKENIZER_FILE, Tokenizer

TEXT_PROMPTS_NEED_ONE = ("text prompts need one: pass --tokenizer FILE, or give token ids with --tokens, "
                         "or recreate the model with `pldr init --tokenizer ...`")
"""What the user can do when text prompts meet a model without a tokenizer."""


def model_tokenizer_path(model_path: str | Path) -> Path:
    """Where a model's tokenizer lives: ``tokenizer.model`` in its folder (or next to its weights file)."""
    path = Path(model_path)
    return (path if path.is_dir() else path.parent) / TOKENIZER_FILE


def find_tokenizer(model_path: str | Path, tokenizer: str | Path | None = None, *, required: bool = True,
                   missing: str = TEXT_PROMPTS_NEED_ONE) -> Tokenizer | None:
    """The ``Tokenizer`` of a model: ``tokenizer`` if given, else ``tokenizer.model`` next to the
    weights. A missing one is a PLDRError ending with ``missing`` (what the user can do about it),
    or None when not ``required``."""
    if tokenizer is not None:
        return Tokenizer(tokenizer)
    path = model_tokenizer_path(model_path)
    if path.is_file():
        return Tokenizer(path)
    if required:
        raise PLDRError(f"{model_path} has no {TOKENIZER_FILE}" + (f"; {missing}" if missing else ""))
    return None


def parse_token_ids(spec: str, vocab_size: int) -> list[int]:
    """'3' or '5,6,7' or '5 6 7' -> ids, each checked against the vocabulary."""
    parts = spec.replace(",", " ").split()
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise PLDRError(f"--tokens {spec!r}: give integer ids separated by commas or spaces") from None
    if not ids:
        raise PLDRError("--tokens needs at least one id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PLDRError(f"--tokens: id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def read_prompts_file(path) -> list[str]:
    """One prompt per line (blank lines skipped); PLDRError when missing or empty."""
    prompts = [line for line in read_text_lines(path, "prompts file") if line.strip()]
    if not prompts:
        raise PLDRError(f"prompts file {path} holds no prompts (one per line)")
    return prompts


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A generation prompt: the text's ids without the document-closing EOS (so the model continues
    the text); the empty text is EOS alone, i.e. the start of a new document."""
    ids = tokenizer.encode(text, eos=False)
    return ids or [tokenizer.eos_id]


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add after the prompt (decoded together, so SentencePiece keeps the space
    between the prompt's last word and the first new one)."""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


def load_for_generation(model_path, *, device=None, dtype=None, gcache=None,
                        force: bool = False) -> tuple[object, GCache | None]:
    """Load a model (float32 first, so the G-cache fingerprint check sees the saved weights), read and
    check ``gcache`` against it, then move both to ``device`` / ``dtype``. Returns (model, GCache|None)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = load_model(model_path)
    gc = None
    if gcache is not None:
        if not model.config.has_metric_path:
            raise PLDRError(f"--gcache only applies to learned-G models; this model's g_mode is "
                            f"{model.config.g_mode!r} (its G_LM is already fixed)")
        gc = read_gcache(gcache, model, force=force)
    cast_for_inference(model.to(device=dev), dt)
    if gc is not None:
        gc = gc.to(device=dev, dtype=metric_dtype(dt))
    return model, gc
