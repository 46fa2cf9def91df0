"""The `pldr generate` run: a request (model directory, prompts, switches) in; events while it decodes
and one record per prompt out. The CLI only parses the request and renders the events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pldr_core.checkpoint import load_config
from pldr_core.device import resolve_dtype
from pldr_core.errors import PLDRError
from pldr_core.generate import GenerationStats, gcache_fidelity, generate
from pldr_core.prompts import (
    continuation_text,
    encode_prompt,
    find_tokenizer,
    load_for_generation,
    parse_token_ids,
    read_prompts_file,
)
from pldr_core.sampling import Sampler


@dataclass
class GenerationRequest:
    """A model directory, the prompts to continue and the decoding switches."""

    model: Path
    texts: list[str] = field(default_factory=list)
    """Text prompts ("" starts a new document)."""
    prompts_file: Path | None = None
    """More text prompts, one per line."""
    token_prompts: list[str] = field(default_factory=list)
    """Prompts as raw ids, e.g. '5,6,7'."""
    tokenizer: Path | None = None
    gcache: Path | None = None
    """A G-cache file: the metric path never runs."""
    force: bool = False
    kv_cache: bool = True
    g_cache: bool = True
    max_new_tokens: int = 50
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    compile: bool | None = None
    """None: on CUDA with the KV-cache (ignored without it)."""
    torch_compile: bool = False
    """Compile the static engine's step with torch.compile (CUDA only)."""
    stream: bool | None = None
    """Report text as it is produced; None: for a single prompt only."""


@dataclass
class Started:
    """The prompts are encoded and the model loaded; decoding starts."""

    labels: list[str]
    stream: bool


@dataclass
class TextDelta:
    """Text a streamed single prompt gained (a trailing partial UTF-8 piece is held back)."""

    row: int
    text: str


@dataclass
class RowDone:
    """A prompt finished: its label and the text generated after it."""

    row: int
    prompt: str
    text: str


@dataclass
class GenerationResult:
    """One record per prompt (the keys of `pldr generate --json`), the batch's decode rate and the
    whole run's totals (also in every record)."""

    records: list[dict]
    batch_decode_tokens_per_s: float | None
    total_new_tokens: int = 0
    """New tokens of all prompts together."""
    total_seconds: float = 0.0
    """Wall time from the loaded model to the last token: compiling, every prefill and every decode
    step; not loading, nor the G-cache fidelity check that follows."""
    compile_s: float = 0.0

    @property
    def total_tokens_per_s(self) -> float | None:
        return self.total_new_tokens / self.total_seconds if self.total_seconds > 0 else None

    @property
    def total_tokens_per_s_excluding_compile(self) -> float | None:
        run = self.total_seconds - self.compile_s
        return self.total_new_tokens / run if run > 0 else None


@dataclass
class _Plan:
    """What a request resolves to before any weight is loaded."""

    sampler: Sampler
    tok: object
    prompts: list[list[int]]
    labels: list[str]


def _prepare(req: GenerationRequest) -> _Plan:
    """Check everything that needs no weights; resolve the sampler, tokenizer, prompts and labels."""
    config = load_config(req.model)  # also refuses a path that is no model
    resolve_dtype(req.dtype)
    if req.gcache is not None and not req.g_cache:
        raise PLDRError("--gcache and --no-g-cache contradict each other; drop one")
    if req.max_new_tokens < 1:
        raise PLDRError(f"--max-new-tokens must be >= 1, got {req.max_new_tokens}")
    sampler = Sampler(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, greedy=req.greedy,
                      seed=req.seed)
    texts = list(req.texts)
    if req.prompts_file is not None:
        texts += read_prompts_file(req.prompts_file)
    if not texts and not req.token_prompts:
        raise PLDRError("give a prompt: --prompt TEXT, --prompts-file FILE or --tokens IDS "
                        "(--prompt \"\" starts a new document)")
    tok = find_tokenizer(req.model, req.tokenizer, required=bool(texts))
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise PLDRError(f"the tokenizer has {tok.vocab_size} pieces but the model only {config.vocab_size}")
    prompts = [encode_prompt(tok, text) for text in texts]
    labels = list(texts)
    for spec in req.token_prompts:
        ids = parse_token_ids(spec, config.vocab_size)
        prompts.append(ids)
        labels.append(tok.decode(ids) if tok is not None else f"[{spec}]")
    longest = max(len(p) for p in prompts)
    if longest + req.max_new_tokens > config.max_seq_len:
        raise PLDRError(f"prompt ({longest} tokens) + --max-new-tokens {req.max_new_tokens} exceeds the "
                        f"model's context of {config.max_seq_len}; shorten one of them")
    return _Plan(sampler=sampler, tok=tok, prompts=prompts, labels=labels)


def _text(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    if tok is None:  # raw ids in, raw ids out
        return " " + " ".join(map(str, new_ids))
    return continuation_text(tok, prompt_ids, new_ids)


def run_generation(req: GenerationRequest) -> Iterator[Started | TextDelta | RowDone | GenerationResult]:
    """Validate ``req``, load the model (and G-cache file), decode all prompts as one batch and yield
    ``Started``, then ``TextDelta``s (streaming a single prompt) and a ``RowDone`` per prompt as
    tokens arrive, and last the ``GenerationResult``."""
    plan = _prepare(req)
    tok, prompts = plan.tok, plan.prompts
    net, gc = load_for_generation(req.model, device=req.device, dtype=req.dtype, gcache=req.gcache,
                                  force=req.force)
    on_cuda = next(net.parameters()).device.type == "cuda"
    use_compile = req.kv_cache and (on_cuda if req.compile is None else req.compile)
    stream = len(prompts) == 1 if req.stream is None else req.stream
    yield Started(labels=plan.labels, stream=stream)

    deltas = stream and len(prompts) == 1
    new_ids: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    stats = GenerationStats(rows=[])
    printed = ""
    t0 = time.perf_counter()
    for t in generate(net, prompts, max_new_tokens=req.max_new_tokens, kv_cache=req.kv_cache,
                      g_cache=gc if gc is not None else req.g_cache, sampler=plan.sampler,
                      eos_id=net.config.eos_id, stats=stats, compile=use_compile,
                      torch_compile=req.torch_compile):
        new_ids[t.row].append(t.id)
        if deltas and tok is not None and not t.done:
            text = continuation_text(tok, prompts[0], new_ids[0]).rstrip("\ufffd")
            if text.startswith(printed) and len(text) > len(printed):
                yield TextDelta(row=0, text=text[len(printed):])
                printed = text
        if t.done:
            finish[t.row] = t.finish_reason
            text = _text(tok, prompts[t.row], new_ids[t.row])
            if deltas:  # what was held back or, without a tokenizer, the ids
                yield TextDelta(row=0, text=text[len(printed):] if text.startswith(printed) else text)
            yield RowDone(row=t.row, prompt=plan.labels[t.row], text=text)
    total_s = time.perf_counter() - t0
    yield _result(req, plan, net, gc, new_ids, finish, stats, use_compile, total_s)


def _result(req, plan, net, gc, new_ids, finish, stats, use_compile, total_s) -> GenerationResult:
    """The records of `pldr generate --json`, one per prompt, with the G-cache file's fidelity."""
    has_metric = net.config.has_metric_path
    g_state = ("file" if gc is not None else "prefill" if req.g_cache else "off") if has_metric else "n/a"
    sampling = "greedy" if plan.sampler.greedy else {"temperature": req.temperature, "top_k": req.top_k,
                                                "top_p": req.top_p, "seed": req.seed}
    batch_rate = stats.decode_tokens_per_s
    batch_rate = None if batch_rate is None else round(batch_rate, 2)
    result = GenerationResult(records=[], batch_decode_tokens_per_s=stats.decode_tokens_per_s,
                              total_new_tokens=sum(len(ids) for ids in new_ids), total_seconds=total_s,
                              compile_s=stats.compile_s)
    totals = {"total_new_tokens": result.total_new_tokens, "total_seconds": round(total_s, 6)}
    for key in ("total_tokens_per_s", "total_tokens_per_s_excluding_compile"):
        value = getattr(result, key)
        totals[key] = None if value is None else round(value, 2)
    for b, ids in enumerate(plan.prompts):
        timing = stats.rows[b]
        rate = timing.decode_tokens_per_s
        row = {
            "prompt": plan.labels[b],
            "prompt_tokens": ids,
            "text": _text(plan.tok, ids, new_ids[b]),
            "tokens": ids + new_ids[b],
            "new_tokens": new_ids[b],
            "finish_reason": finish[b],
            "prefill_ms": round(timing.prefill_ms, 3),
            "decode_ms": round(timing.decode_s * 1e3, 3),
            "decode_tokens_per_s": None if rate is None else round(rate, 2),
            "kv_cache": req.kv_cache,
            "g_cache": g_state,
            "compile": use_compile,
            "compile_s": round(stats.compile_s, 3),
            "sampling": sampling,
        }
        if gc is not None:
            row["gcache"] = str(req.gcache)
            row["gcache_fidelity"] = gcache_fidelity(net, ids, gc)
        row["batch_size"] = len(plan.prompts)
        row["batch_decode_tokens_per_s"] = batch_rate
        row.update(totals)  # the whole run's, the same in every record
        result.records.append(row)
    return result
