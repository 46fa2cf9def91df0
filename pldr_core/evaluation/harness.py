"""The lm-evaluation-harness adapter: a ``TemplateLM`` registered as ``pldr`` (no fork of the harness).

Usable from lm-eval's Python API once this module is imported::

    import pldr_core.evaluate, lm_eval
    lm_eval.simple_evaluate(model="pldr", model_args="pretrained=runs/x/final,gcache=g.safetensors",
                            tasks=["arc_easy"])

Scoring. Without a G-cache the metric path makes A (hence G_LM and every logit) depend on every
token of the input, padding included, so each window is scored UNPADDED, as the paper scores: a batch
only holds windows of equal length. With a G-cache file the metric path never runs (nor does it in a
model without one: identity or fixed G), the model is causal, and windows of any length batch together
with right padding (padding after a position cannot change its logits).

Windows. A request is (context, continuation) token ids; every continuation token is scored exactly
once, each from a window of at most ``max_length`` input tokens ending just before it. A short request
is one window; a long context is cut from the left; a continuation longer than the model's context is
scored in successive windows (the rolling scheme of perplexity tasks, where the context is the EOS
token alone).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pldr_core.cache import GCache
from pldr_core.checkpoint import load_model
from pldr_core.device import resolve_device
from pldr_core.errors import PLDRError
from pldr_core.gcache import read_gcache
from pldr_core.generate import decode_steps
from pldr_core.prompts import find_tokenizer
from pldr_core.sampling import Sampler, greedy
from pldr_core.tokenizer import Tokenizer

Progress = Callable[[int, int, str], None]
"""progress(advance, total, description): called as windows/requests finish."""

EVAL_NEEDS_ONE = ("evaluation needs the model's SentencePiece tokenizer (put it there, or make the model "
                  "with `pldr init --tokenizer FILE`)")


def score_windows(context: list[int], continuation: list[int], max_length: int):
    """Split one request into windows ``(input_ids, targets)``: the logits of the last
    ``len(targets)`` input positions predict ``targets``. Every continuation token is a target once."""
    full = context + continuation
    n, cur = len(full), len(context)
    if cur < 1:
        raise ValueError("a request needs at least one context token (the EOS prefix)")
    out = []
    while cur < n:
        last = min(n - 1, cur + max_length - 1)  # last target of this window
        start = max(0, last - max_length)
        out.append((full[start:last], full[cur:last + 1]))
        cur = last + 1
    return out


@register_model("pldr")
class PLDRLM(TemplateLM):
    """A PLDR-LLM for lm-eval. ``pretrained``: a model directory (or give ``model`` and ``tokenizer``
    objects); ``gcache``: a G-cache file (or a filled ``GCache``) that replaces the metric path."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, gcache=None,
                 force: bool = False, batch_size: int | str = 1, max_batch_size: int | None = None,
                 device: str | None = None, max_length: int | None = None,
                 progress: Progress | None = None, **_ignored):
        super().__init__()

        if model is None:
            if pretrained is None:
                raise PLDRError("the pldr lm-eval model needs pretrained=MODEL_DIR")
            tok = find_tokenizer(pretrained, tokenizer, missing=EVAL_NEEDS_ONE)
            model = load_model(pretrained, device=resolve_device(device), dtype=torch.float32)
        else:
            if tokenizer is None:
                raise PLDRError("pass tokenizer= with model=")
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
            if device is not None:
                model = model.to(resolve_device(device))
        self.model = model.eval()
        self.tok = tok
        if tok.vocab_size > model.config.vocab_size:
            raise PLDRError(f"tokenizer has {tok.vocab_size} pieces but the model only "
                            f"{model.config.vocab_size} embeddings: wrong tokenizer for this model")
        self._device = next(model.parameters()).device
        self.batch_size = parse_batch_size(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.progress = progress
        if isinstance(gcache, (str, Path)):
            gcache = read_gcache(gcache, model, force=force)
        elif gcache is not None and not isinstance(gcache, GCache):
            raise PLDRError(f"gcache must be a G-cache file path or a GCache, not {type(gcache).__name__}")
        self.gcache = gcache

    @property
    def causal(self) -> bool:
        """True when no logit depends on later tokens: a G-cache file replaces the metric path, or
        the model has none (identity / fixed G). Then right padding is harmless."""
        return self.gcache is not None or not self.model.config.has_metric_path

    # ---- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # no BOS in this model family: a document starts after an EOS
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, eos=False)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # ---- scoring ------------------------------------------------------------------------------
    def _report(self, advance: int, total: int, what: str) -> None:
        if self.progress is not None:
            self.progress(advance, total, what)

    @torch.no_grad()
    def _forward_logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities [len(row), V] for each row. Rows must all have one length unless the
        model is causal (then they are right-padded)."""
        lengths = [len(r) for r in rows]
        width = max(lengths)
        if not self.causal and min(lengths) != width:
            raise AssertionError("without a G-cache only equal-length rows may share a batch")
        pad = self.tok.pad_id if self.tok.pad_id >= 0 else 0
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        logits = self.model(batch.to(self._device), g_cache=self.gcache).logits
        return [F.log_softmax(logits[i, :n].float() if logits.dtype != torch.float64 else logits[i, :n],
                              dim=-1) for i, n in enumerate(lengths)]

    def _batches(self, order: list[int], lengths: list[int]):
        """Group window indices (sorted longest first) into batches: equal lengths only while A
        depends on the whole input, any lengths once the model is causal."""
        batch: list[int] = []
        for idx in order:
            if batch and (len(batch) >= self.batch_size
                          or (not self.causal and lengths[idx] != lengths[batch[0]])):
                yield batch
                batch = []
            batch.append(idx)
        if batch:
            yield batch

    def score_requests(self, requests: list[tuple[list[int], list[int]]],
                       what: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every token is the argmax) per request."""
        windows, owner = [], []
        for r, (ctx, cont) in enumerate(requests):
            if not ctx:
                ctx = [self.prefix_token_id]
            for w in score_windows(list(ctx), list(cont), self.max_length):
                windows.append(w)
                owner.append(r)
        lengths = [len(w[0]) for w in windows]
        order = sorted(range(len(windows)), key=lambda i: -lengths[i])
        ll = [0.0] * len(requests)
        greedy = [True] * len(requests)
        total = len(windows)
        for batch in self._batches(order, lengths):
            logprobs = self._forward_logprobs([windows[i][0] for i in batch])
            for i, lp in zip(batch, logprobs):
                targets = torch.tensor(windows[i][1], device=lp.device)
                tail = lp[-len(targets):]
                ll[owner[i]] += float(tail.gather(1, targets[:, None]).sum())
                greedy[owner[i]] &= bool((tail.argmax(dim=-1) == targets).all())
            self._report(len(batch), total, what)
        return list(zip(ll, greedy))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self.score_requests([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.progress is not None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity scoring: every token of each text scored once, the first after the EOS prefix,
        in successive windows of the model's context."""
        texts = [req.args[0] for req in requests]
        reqs = [([self.prefix_token_id], self.tok_encode(t)) for t in texts]
        out = [ll for ll, _ in self.score_requests(reqs, "loglikelihood_rolling")]
        for t, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), ll)
        return out

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self.generate_one(context, **dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
            self._report(1, len(requests), "generate_until")
        return out

    @torch.no_grad()
    def generate_one(self, context: str, until=None, max_gen_toks: int = 256, do_sample: bool = False,
                     temperature: float = 0.0, **_ignored) -> str:
        """Decode greedily (or sample at ``temperature``) with the KV-cache until EOS, a stop string
        or ``max_gen_toks``; the text is cut before the first stop string."""

        stops = [until] if isinstance(until, str) else list(until or [])
        stops = [s for s in stops if s]
        max_new = max(1, min(int(max_gen_toks), self.max_length - 1))
        # as in loglikelihood: the EOS prefix stands in for an empty context only
        ids = (self.tok_encode(context) if context else []) or [self.prefix_token_id]
        ids = ids[-(self.max_length - max_new):]
        sample = do_sample and temperature and temperature > 0
        choose = Sampler(temperature=temperature, top_k=None) if sample else greedy
        prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
        g = self.gcache if self.gcache is not None else True
        new: list[int] = []
        text = ""
        for step in decode_steps(self.model, prompt, max_new, kv_cache=True, g_cache=g, choose=choose):
            token = int(step.token[0])
            if token == self.eot_token_id:
                break
            new.append(token)
            text = self.tok.decode(new)
            if any(s in text for s in stops):
                break
        cut = min([text.index(s) for s in stops if s in text], default=len(text))
        return text[:cut]


def parse_batch_size(value) -> int:
    """An lm-eval batch size (an int, or 'auto...', which picks 16) as a positive int."""
    if isinstance(value, str):
        if value.startswith("auto"):
            return 16
        value = int(value)
    if int(value) < 1:
        raise PLDRError(f"batch size must be >= 1, got {value}")
    return int(value)
