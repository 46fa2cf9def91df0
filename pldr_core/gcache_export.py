"""`pldr export-gcache` from a model directory: prompts (texts or raw ids) in, the G-cache file and
a summary of how much G_LM varies across the prompts out."""

from __future__ import annotations

from pathlib import Path

from pldr_core.checkpoint import load_config, load_model
from pldr_core.device import resolve_device
from pldr_core.errors import PLDRError
from pldr_core.gcache import REDUCTIONS, export_gcache
from pldr_core.prompts import find_tokenizer, parse_token_ids, read_prompts_file


def export_gcache_file(model_path: str | Path, out: str | Path, *, texts: list[str] = (),
                       prompts_file: str | Path | None = None, token_prompts: list[str] = (),
                       reduce: str = "first", tokenizer: str | Path | None = None,
                       device: str | None = "cpu") -> dict:
    """Run the metric path of the model at ``model_path`` on the prompts and write the G-cache file.

    Text prompts are encoded as documents (followed by EOS); ``token_prompts`` are raw ids such as
    '5,6,7' and need no tokenizer; with no prompt at all, the EOS token alone. Returns
    ``GCacheExport.summary()`` plus ``prompt_tokens`` (each prompt's length)."""
    if reduce not in REDUCTIONS:
        raise PLDRError(f"--reduce must be first or mean, got {reduce!r}")
    config = load_config(model_path)  # also refuses a path that is no model
    if not config.has_metric_path:
        raise PLDRError(f"{model_path} has g_mode {config.g_mode!r}: no metric path to export a G-cache "
                        f"from (only learned-G models have one)")
    out = Path(out)
    if out.is_dir():
        raise PLDRError(f"--out {out} is a directory; give a file name such as g.safetensors")
    texts = list(texts)
    if prompts_file is not None:
        texts += read_prompts_file(prompts_file)
    ids, labels = [], []
    if texts:
        tok = find_tokenizer(model_path, tokenizer)
        ids += [tok.encode(text) for text in texts]  # as documents: text then EOS; "" -> [EOS]
        labels += texts
    for spec in token_prompts:
        ids.append(parse_token_ids(spec, config.vocab_size))
        labels.append(f"tokens:{spec}")
    if not ids:
        ids, labels = [[config.eos_id]], [""]
    for label, p in zip(labels, ids):
        if len(p) > config.max_seq_len:
            raise PLDRError(f"prompt {label[:40]!r} has {len(p)} tokens, more than the model's context of "
                            f"{config.max_seq_len}; shorten it")
    model = load_model(model_path, device=resolve_device(device))
    data = export_gcache(model, ids, out, reduce=reduce, labels=labels).summary()
    data["prompt_tokens"] = [len(p) for p in ids]
    return data
