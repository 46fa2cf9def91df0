"""Autoregressive decoding as a Python generator that yields tokens (SPEC section 2 cache semantics).

Cache combinations (``kv`` and ``g`` switches are independent):
- neither: every step reruns the whole text, so A is recomputed from the whole current text;
- KV only: the prefill caches k, v and A; later steps recompute G_LM from the frozen A;
- G only: the prefill's (or a file's) G_LM is reused; every step reruns the whole text;
- KV + G: both; with a G-cache file the metric path never runs at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pldr_core.attention import metric_dtype
from pldr_core.cache import GCache, KVCache
from pldr_core.device import resolve_device, resolve_dtype
from pldr_core.sampling import Step, greedy


def _g_cache_for(model, g_cache: bool | GCache, batch: int) -> GCache | None:
    """The GCache a decode uses: the given (file) one, an empty one for the prefill to fill, or none."""
    if isinstance(g_cache, GCache):
        return g_cache
    if g_cache and model.config.has_metric_path:
        return GCache.for_model(model, batch)
    return None


@torch.no_grad()
def decode_steps(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    kv_cache: bool = True,
    g_cache: bool | GCache = True,
    choose=greedy,
) -> Iterator[Step]:
    """Yield ``max_new_tokens`` steps for ``prompt`` [B, S] (all rows the same length).

    ``g_cache`` is True (take G from the prefill), False (no G-cache) or a filled ``GCache`` (from a
    file). ``choose`` maps logits [B, V] to ids [B] (greedy by default). Stopping at EOS is the
    caller's business: this is the mechanism, not the policy.
    """
    B, S = prompt.shape
    gc = _g_cache_for(model, g_cache, B)
    kv = KVCache.for_model(model, B, S + max_new_tokens) if kv_cache else None

    text = prompt
    logits = model(prompt, kv_cache=kv, g_cache=gc).logits[:, -1]
    for step in range(max_new_tokens):
        token = choose(logits)
        yield Step(token=token, logits=logits)
        if step + 1 == max_new_tokens:
            return
        if kv is not None:
            logits = model(token[:, None], kv_cache=kv, g_cache=gc).logits[:, -1]
        else:
            text = torch.cat([text, token[:, None]], dim=1)
            logits = model(text, g_cache=gc).logits[:, -1]


# ---- generation as a generator -----------------------------------------------------------------
@dataclass
class Token:
    """One generated token of one prompt (row)."""

    row: int
    """Which prompt it belongs to (index into the ``prompts`` list)."""
    id: int
    """The chosen id."""
    index: int
    """0 for the first new token of that row, 1 for the next, ..."""
    logits: torch.Tensor
    """[V] the logits it was chosen from."""
    done: bool
    """True when the row stops after this token (EOS or ``max_new_tokens``)."""
    finish_reason: str | None = None
    """'eos' or 'length' when ``done``."""


@dataclass
class RowTiming:
    prefill_ms: float = 0.0
    """Wall time of this row's prefill (metric path unless a G-cache file is used, KV writes)."""
    decode_s: float = 0.0
    """Wall time of the decode steps (forward + sampling) that produced this row's later tokens."""
    new_tokens: int = 0
    """Tokens generated for this row; the first comes from the prefill's logits."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else None


@dataclass
class GenerationStats:
    """Filled in place by ``generate`` while it runs (timing per row and for the whole batch)."""

    rows: list[RowTiming]
    decode_s: float = 0.0
    """Wall time of all decode steps (the batch shares them with the KV-cache on)."""
    new_tokens: int = 0
    compile_s: float = 0.0
    """Wall time spent compiling and capturing the decode step before decoding (``compile`` on CUDA);
    not part of ``decode_s``."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens produced by decode steps (all but each row's first) per second of decoding."""
        return (self.new_tokens - len(self.rows)) / self.decode_s if self.decode_s > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    kv_cache: bool = True,
    g_cache: bool | GCache = True,
    sampler=greedy,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
    compile: bool = False,
) -> Iterator[Token]:
    """Generate continuations of ``prompts`` (lists of ids, any lengths), yielding ``Token``s.

    Each prompt is prefilled on its own, unpadded (A sums over every token, so padding would change
    it): through ``KVCache.row(b)`` / ``GCache.row(b)`` views with the KV-cache on, after which all
    rows decode together as one batch (per-row positions); rows that produced EOS stop (they are fed
    EOS until the batch ends, their outputs dropped). Without the KV-cache every step reruns each
    row's whole text, row by row. ``g_cache``: True (G from each row's prefill), False (none) or a
    filled ``GCache`` (a file; the metric path never runs). Every row therefore gets exactly the
    tokens it gets alone. Tokens are yielded step by step, rows in order within a step.

    ``compile`` (with the KV-cache on; ignored without it): decode through the static-cache
    ``DecodeEngine`` instead, one engine per group of equal-length prompts, the groups stepped in
    lockstep so that ``sampler`` still sees all rows' logits [B, V] at once (same draws as the eager
    path). On CUDA the engine's step is compiled with ``torch.compile`` and replayed as a CUDA graph
    (compiled before the prefill; that time goes to ``stats.compile_s``); elsewhere the engine runs
    eagerly (compiling costs more than it saves there). Each row of a group reports the group's
    prefill time. Same tokens, same EOS stopping, same ``Token``s as the eager path.
    """
    from pldr_core.errors import PLDRError

    if not prompts or any(len(p) == 0 for p in prompts):
        raise PLDRError("every prompt needs at least one token (the empty text encodes to EOS)")
    if max_new_tokens < 1:
        raise PLDRError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    B = len(prompts)
    rows = [torch.tensor(p, dtype=torch.long, device=device) for p in prompts]
    if stats is None:
        stats = GenerationStats(rows=[RowTiming() for _ in range(B)])
    else:
        stats.rows = [RowTiming() for _ in range(B)]
    if compile and kv_cache:
        yield from _generate_static(model, rows, max_new_tokens=max_new_tokens, g_cache=g_cache,
                                    sampler=sampler, eos_id=eos_id, stats=stats, device=device)
        return
    gc = _g_cache_for(model, g_cache, B)
    kv = KVCache.for_model(model, B, max(len(p) for p in prompts) + max_new_tokens) if kv_cache else None

    def g_row(b):
        return None if gc is None else gc.row(b)

    # Prefill: row by row, unpadded.
    last = []
    for b, ids in enumerate(rows):
        t0 = time.perf_counter()
        out = model(ids[None], kv_cache=None if kv is None else kv.row(b), g_cache=g_row(b))
        last.append(out.logits[0, -1])
        _sync(device)
        stats.rows[b].prefill_ms = (time.perf_counter() - t0) * 1e3
    logits = torch.stack(last)

    texts = list(rows)

    def next_logits(step, chosen, active, previous):
        if kv is not None:
            return model(_feed(chosen, active, eos_id)[:, None], kv_cache=kv, g_cache=gc).logits[:, -1]
        new = previous.clone()  # finished rows keep their (unused) logits
        for b in range(B):
            if active[b]:
                texts[b] = torch.cat([texts[b], chosen[b:b + 1]])
                new[b] = model(texts[b][None], g_cache=g_row(b)).logits[0, -1]
        return new

    yield from _decode_loop(logits, next_logits, max_new_tokens=max_new_tokens, sampler=sampler,
                            eos_id=eos_id, stats=stats)


def _feed(chosen: torch.Tensor, active: list[bool], eos_id: int | None) -> torch.Tensor:
    """The next input ids: the chosen tokens, with EOS fed to rows that have already finished."""
    done_id = torch.full_like(chosen, eos_id if eos_id is not None else 0)
    return torch.where(torch.tensor(active, device=chosen.device), chosen, done_id)


def _decode_loop(logits, next_logits, *, max_new_tokens, sampler, eos_id, stats):
    """Sample, time and yield one ``Token`` per active row per step; ``next_logits(step, chosen,
    active, logits)`` runs the model for the steps after the first (whose ``logits`` come from the
    prefill)."""
    B = logits.shape[0]
    active = [True] * B
    chosen = None
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        if step > 0:
            logits = next_logits(step, chosen, active, logits)
        chosen = sampler(logits)
        ids = chosen.tolist()  # synchronises with the device
        dt = time.perf_counter() - t0 if step > 0 else 0.0
        stats.decode_s += dt
        for b in range(B):
            if not active[b]:
                continue
            timing = stats.rows[b]
            if step > 0:
                timing.decode_s += dt
            is_eos = eos_id is not None and ids[b] == eos_id
            done = is_eos or step + 1 == max_new_tokens
            timing.new_tokens += 1
            stats.new_tokens += 1
            if done:
                active[b] = False
            yield Token(row=b, id=ids[b], index=step, logits=logits[b], done=done,
                        finish_reason=("eos" if is_eos else "length") if done else None)
        if not any(active):
            return


# Distinct batch sizes the static engines compile for before falling back to uncompiled engines
# (torch._dynamo's default recompile limit is 8; bench and earlier calls may hold some entries).
_MAX_ENGINE_SHAPES = 4


@torch.inference_mode(False)
@torch.no_grad()
def _generate_static(model, rows, *, max_new_tokens, g_cache, sampler, eos_id, stats, device):
    """``generate`` with the KV-cache through ``DecodeEngine``s: one per prompt length, in lockstep.

    Runs under no_grad rather than inference mode: the engine's static buffers are updated in place
    by a compiled step / captured CUDA graph, the setting in which the engine is tested."""
    from pldr_core.engine import DecodeEngine

    B = len(rows)
    if not model.config.has_metric_path:
        g_source, g_file = "none", None  # identity / frozen G: the engine holds it (a G-cache is unused)
    elif isinstance(g_cache, GCache):
        g_source, g_file = "file", g_cache
    else:
        g_source, g_file = ("prefill" if g_cache else "none"), None
    groups: dict[int, list[int]] = {}
    for b, ids in enumerate(rows):
        groups.setdefault(len(ids), []).append(b)
    # Every engine gets the same length, so the compiled step differs between groups only by batch
    # size. Each distinct shape is one more compile of the same (fullgraph) step, and dynamo refuses
    # past its recompile limit: beyond that many batch sizes the engines run uncompiled.
    max_len = max(groups) + max_new_tokens
    shapes = {len(members) for members in groups.values()}
    use_compile = device.type == "cuda" and len(shapes) <= _MAX_ENGINE_SHAPES
    engines = []
    for S, members in groups.items():
        engine = DecodeEngine(model, batch=len(members), max_len=max_len, g_source=g_source,
                              g_cache=g_file, compile=use_compile)
        if use_compile and max_new_tokens > 1:
            t0 = time.perf_counter()
            engine.warm_up()
            _sync(device)
            stats.compile_s += time.perf_counter() - t0
        engines.append((S, torch.tensor(members, device=device), members, engine))

    # Prefill: each group at once (equal lengths, so unpadded), into its engine's static caches.
    logits = None
    for S, idx, members, engine in engines:
        t0 = time.perf_counter()
        out = engine.prefill(torch.stack([rows[b] for b in members]))
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        for b in members:
            stats.rows[b].prefill_ms = ms
        if logits is None:
            logits = out.new_empty(B, out.shape[-1])
        logits.index_copy_(0, idx, out)

    def next_logits(step, chosen, active, previous):
        feed = _feed(chosen, active, eos_id)
        if len(engines) == 1:  # one prompt length: the rows are already in engine order
            S, _, _, engine = engines[0]
            return engine.step(feed, S + step - 1)
        new = torch.empty_like(previous)
        for S, idx, _, engine in engines:
            new.index_copy_(0, idx, engine.step(feed.index_select(0, idx), S + step - 1))
        return new

    yield from _decode_loop(logits, next_logits, max_new_tokens=max_new_tokens, sampler=sampler,
                            eos_id=eos_id, stats=stats)


# ---- the paper's claim, measured ---------------------------------------------------------------
@torch.inference_mode()
def gcache_fidelity(model, ids: list[int], g_cache: GCache) -> dict:
    """How far a G-cache (from a file / another prompt) moves the logits of ``ids`` from full PLGA
    (the metric path run on ``ids`` itself): max |logit difference| at the last position and over
    all positions, and how often the greedy next token agrees (teacher-forced, every position)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    full = model(x).logits[0].double()
    cached = model(x, g_cache=g_cache).logits[0].double()
    diff = (full - cached).abs()
    agree = full.argmax(-1) == cached.argmax(-1)
    return {
        "max_abs_logit_diff_last": float(diff[-1].max()),
        "max_abs_logit_diff": float(diff.max()),
        "logit_scale": float(full.abs().max()),
        "next_token_agrees": bool(agree[-1]),
        "argmax_agreement": float(agree.double().mean()),
        "positions": len(ids),
    }


# ---- prompts and model directories -------------------------------------------------------------
def find_tokenizer(model_path, tokenizer=None):
    """The ``Tokenizer`` of a model: ``tokenizer`` if given, else ``tokenizer.model`` next to the weights."""
    from pldr_core.tokenizer import tokenizer_for

    return tokenizer_for(model_path, tokenizer, missing="text prompts need one: pass --tokenizer FILE, "
                         "or give token ids with --tokens, or recreate the model with "
                         "`pldr init --tokenizer ...`")


def parse_token_ids(spec: str, vocab_size: int) -> list[int]:
    """'3' or '5,6,7' or '5 6 7' -> ids, each checked against the vocabulary."""
    from pldr_core.errors import PLDRError

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
    from pldr_core.errors import PLDRError
    from pldr_core.files import read_text_lines

    prompts = [line for line in read_text_lines(path, "prompts file") if line.strip()]
    if not prompts:
        raise PLDRError(f"prompts file {path} holds no prompts (one per line)")
    return prompts


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A generation prompt: the text's ids without the document-closing EOS (so the model continues
    the text); the empty text is EOS alone, i.e. the start of a new document."""
    ids = tokenizer.encode(text, eos=False)
    return ids or [tokenizer.eos_id]




def load_for_generation(model_path, *, device=None, dtype=None, gcache=None, force: bool = False):
    """Load a model (float32 first, so the G-cache fingerprint check sees the saved weights), read and
    check ``gcache`` against it, then move both to ``device`` / ``dtype``. Returns (model, GCache|None)."""
    from pldr_core.checkpoint import load_model
    from pldr_core.errors import PLDRError
    from pldr_core.gcache import read_gcache
    from pldr_core.model import cast_for_inference

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


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add after the prompt (decoded together, so SentencePiece keeps the space
    between the prompt's last word and the first new one)."""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)
