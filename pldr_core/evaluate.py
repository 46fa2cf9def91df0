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

import contextlib
import dataclasses
import difflib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pldr_core.cache import GCache
from pldr_core.checkpoint import detect_layout, load_model
from pldr_core.device import resolve_device
from pldr_core.errors import PLDRError
from pldr_core.gcache import read_gcache
from pldr_core.generate import decode_steps
from pldr_core.sampling import Sampler, greedy
from pldr_core.tasks import expand_tasks, plan_tasks
from pldr_core.tokenizer import Tokenizer, tokenizer_for

Progress = Callable[[int, int, str], None]
"""progress(advance, total, description): called as windows/requests finish."""




def load_tokenizer(model_path: str | Path, tokenizer: str | Path | None = None):

    return tokenizer_for(model_path, tokenizer, missing="evaluation needs the model's SentencePiece "
                         "tokenizer (put it there, or make the model with `pldr init --tokenizer FILE`)")


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
            tok = load_tokenizer(pretrained, tokenizer)
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
        self.batch_size = _parse_batch_size(batch_size)
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
        # no BOS in this model family: a document starts after an EOS (SPEC section 3, token data)
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


def _parse_batch_size(value) -> int:
    if isinstance(value, str):
        if value.startswith("auto"):
            return 16
        value = int(value)
    if int(value) < 1:
        raise PLDRError(f"batch size must be >= 1, got {value}")
    return int(value)


# ---- the `pldr eval` driver ----------------------------------------------------------------------
@dataclasses.dataclass
class EvalReport:
    """What one `pldr eval` run produced."""

    results: dict
    """lm-eval's results dict (without G-cache when comparing)."""
    compare: dict | None
    """lm-eval's results with the G-cache, for --compare-gcache."""
    skipped: dict[str, str]
    ran: list[str]
    offline: bool
    data_dir: str | None
    wall_s: float


def score_rows(results: dict) -> list[dict]:
    """Flatten lm-eval results to rows {task, metric, filter, value, stderr} (numeric metrics)."""
    rows = []
    for task, res in (results.get("results") or {}).items():
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


@contextlib.contextmanager
def _offline_env(on: bool):
    """Offline, make the hub libraries fail fast instead of retrying a dead network."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in names}
    if on:
        for k in names:
            os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records ``git describe`` of the current directory and lets git print "fatal: not a git
    repository" when there is none; ask git the same question with its stderr silenced."""

    import lm_eval.evaluator as ev

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.decode().strip() or None if out.returncode == 0 else None

    old = ev.get_git_commit_hash
    ev.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        ev.get_git_commit_hash = old


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    return (text[:237] + "...") if len(text) > 240 else text


def _quiet_logs(debug: bool) -> None:
    level = logging.INFO if debug else logging.ERROR
    for name in ("lm_eval", "lm-eval", "datasets", "huggingface_hub", "fsspec", "filelock"):
        logging.getLogger(name).setLevel(level)
    if not debug:
        try:
            import datasets

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
        except ImportError:
            pass


def load_tasks(names: list[str], task_manager) -> tuple[list, dict[str, str]]:
    """Load each task once (so one missing data set does not stop the rest): the task objects for
    lm-eval, and name -> reason for those that failed. An unknown name is a PLDRError."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PLDRError(f"unknown task {name!r}{hint}: give lm-eval task names (`lm-eval ls tasks`), "
                            f"pldr_zeroshot, or a task YAML file")
    objs, skipped = [], {}
    for name in names:
        try:
            loaded = task_manager.load([name])
        except Exception as exc:  # a task's data missing or unreadable: skip it, run the rest
            skipped[name] = f"task data not available: {_one_line(exc)}"
            continue
        tasks, groups = loaded.get("tasks", {}), loaded.get("groups", {})
        if not groups and len(tasks) == 1:
            objs.extend(tasks.values())
        else:
            objs.append(name)
    return objs, skipped


def run_eval(model_path: str | Path, tasks: str | list[str], *, gcache: str | Path | None = None,
             compare_gcache: str | Path | None = None, force: bool = False, batch_size: int = 8,
             limit: int | float | None = None, device: str | None = "auto",
             data_dir: str | Path | None = None, offline: bool | None = None,
             progress: Progress | None = None, on_plan: Callable | None = None,
             debug: bool = False) -> EvalReport:
    """Evaluate a model directory on lm-eval tasks (``pldr_zeroshot`` expands to the paper's suite).

    Offline (no hub reachable, or ``data_dir`` given) the suite reads local data (``pldr_core.tasks``);
    tasks whose data is missing are skipped with the reason, the rest still run; if none can run it
    is a PLDRError. ``compare_gcache`` scores twice, without and with that G-cache file.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager


    if gcache is not None and compare_gcache is not None:
        raise PLDRError("--gcache and --compare-gcache exclude each other (compare scores both ways)")
    names = expand_tasks(tasks)
    for name in names:  # before lm-eval indexes its task registry (slow)
        if name.endswith((".yaml", ".yml")) and not Path(name).is_file():
            raise PLDRError(f"task file not found: {name}")
    detect_layout(model_path)
    tok = load_tokenizer(model_path)
    for f in (gcache, compare_gcache):
        if f is not None and not Path(f).is_file():
            raise PLDRError(f"G-cache file not found: {f}")
    if limit is not None and limit <= 0:
        raise PLDRError(f"--limit must be positive, got {limit}")
    batch_size = _parse_batch_size(batch_size)
    dev = resolve_device(device)
    _quiet_logs(debug)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pldr-eval-") as work:
        plan = plan_tasks(names, work_dir=work, data_dir=data_dir, offline=offline)
        with _offline_env(plan.offline):
            tm = TaskManager(include_path=str(plan.include_path) if plan.include_path else None,
                             include_defaults=plan.needs_builtin_index)
            task_objs, failed = load_tasks(plan.tasks, tm)
            skipped = {**plan.skipped, **failed}
            skipped = {n: skipped[n] for n in names if n in skipped}
            if not task_objs:
                reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
                raise PLDRError(f"no task can run ({reasons})")
            ran = [t if isinstance(t, str) else t.config.task for t in task_objs]
            if on_plan is not None:
                on_plan(ran, skipped, plan)

            model = load_model(model_path, device=dev, dtype=torch.float32)
            g_main = read_gcache(gcache, model, force=force) if gcache is not None else None
            g_cmp = read_gcache(compare_gcache, model, force=force) if compare_gcache is not None else None
            lm = PLDRLM(model=model, tokenizer=tok, gcache=g_main, batch_size=batch_size,
                        progress=progress)

            def run():
                return simple_evaluate(model=lm, tasks=list(task_objs), task_manager=tm, limit=limit,
                                       log_samples=False, batch_size=batch_size, device=str(dev))

            with _quiet_git_hash():
                results = run()
            compare = None
            if g_cmp is not None:
                lm.gcache = g_cmp
                with _quiet_git_hash():
                    compare = run()
    wall = time.perf_counter() - t0
    meta = {"model": str(model_path), "gcache": str(gcache) if gcache else None,
            "compare_gcache": str(compare_gcache) if compare_gcache else None,
            "offline": plan.offline, "data_dir": str(plan.data_dir) if plan.data_dir else None,
            "skipped": skipped, "wall_s": round(wall, 3), "limit": limit, "batch_size": batch_size}
    for r in (results, compare):
        if r is not None:
            r["pldr"] = meta
    return EvalReport(results=results, compare=compare, skipped=skipped, ran=ran, offline=plan.offline,
                      data_dir=meta["data_dir"], wall_s=wall)


def results_json(report: EvalReport) -> str:
    """lm-eval's results JSON; with --compare-gcache both runs under "no_gcache" and "gcache"."""
    from lm_eval.utils import handle_non_serializable

    obj = report.results if report.compare is None else {"no_gcache": report.results,
                                                          "gcache": report.compare}
    return json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
