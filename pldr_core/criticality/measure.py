"""``measure_criticality``: prompts, runs 1 and 2, run C, the order parameter and the diagnostics;
``criticality_probe``: the cheap version a trainer calls at each validation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pldr_core.criticality.heads import PER_HEAD, SPECTRA, DriftAccumulator, HeadAccumulator, head_figures
from pldr_core.criticality.order import OrderAccumulator, readout
from pldr_core.errors import PLDRError
from pldr_core.generate import generate
from pldr_core.sampling import Sampler


@dataclass(kw_only=True)
class Protocol:
    """Every setting of a measurement (written to the JSON as ``protocol``)."""

    samples: int = 100
    max_prompt_tokens: int = 256
    new_tokens: int = 256
    top_p: float = 0.8
    temperature: float = 1.0
    seed: int = 0
    drift_tokens: int = 16
    """eps_G is measured after each of the first ``drift_tokens`` new tokens of run 1."""
    source: str = ""
    """Where the prompts came from (a prompts file, a token data folder, the embedded corpus)."""
    g_mode: str = ""
    rope_style: str = ""
    dtype: str = ""
    device: str = ""

    def check(self) -> None:
        if self.samples < 1:
            raise PLDRError(f"--samples must be at least 1, got {self.samples}")
        if self.new_tokens < 1:
            raise PLDRError(f"--new-tokens must be at least 1, got {self.new_tokens}")
        if self.max_prompt_tokens < 1:
            raise PLDRError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise PLDRError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise PLDRError(f"--temperature must be > 0, got {self.temperature}")
        if self.drift_tokens < 0:
            raise PLDRError(f"--drift-tokens must be >= 0, got {self.drift_tokens}")


@dataclass
class Sample:
    prompt_ids: list[int]
    run1_ids: list[int]
    run2_ids: list[int]
    """The new tokens only (each run stops at EOS or ``new_tokens``)."""


@dataclass
class CriticalityResult:
    """What ``measure_criticality`` returns; ``to_json()`` gives the document with the issue's names."""

    protocol: Protocol
    order_parameter: dict[str, float]
    order_parameter_12: dict[str, float]
    stats: dict[str, dict[str, dict[str, float]]]
    per_layer: list[dict]
    per_head: list[dict]
    eps_G: list[dict]
    spectra: list[dict]
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)

    @property
    def g_constant(self) -> bool:
        """G_LM does not depend on the input (identity, random or fixed G): OP(G_LM) is 0 by definition."""
        return self.protocol.g_mode != "learned"

    def to_json(self) -> dict:
        return {"protocol": asdict(self.protocol), "order_parameter": self.order_parameter,
                "order_parameter_12": self.order_parameter_12, "stats": self.stats,
                "per_layer": self.per_layer, "per_head": self.per_head, "eps_G": self.eps_G,
                "spectra": self.spectra, "samples": [asdict(s) for s in self.samples], "notes": self.notes}


Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def sample_runs(model, prompts: list[list[int]], *, new_tokens: int, top_p: float, temperature: float,
                seed: int, compile: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Runs 1 and 2: new tokens for every prompt with seeds ``seed`` and ``seed + 1``, no G-cache,
    decoded as one batch (KV-cache on; the static-cache engine when ``compile``)."""
    runs = []
    for s in (seed, seed + 1):
        out = [[] for _ in prompts]
        sampler = Sampler(temperature=temperature, top_k=None, top_p=top_p, seed=s)
        for tok in generate(model, prompts, max_new_tokens=new_tokens, kv_cache=True, g_cache=False,
                            sampler=sampler, eos_id=model.config.eos_id, compile=compile):
            out[tok.row].append(tok.id)
        runs.append(out)
    return runs[0], runs[1]


def _check_fits(model, prompts: list[list[int]], new_tokens: int) -> None:
    cfg = model.config
    if new_tokens >= cfg.max_seq_len:
        raise PLDRError(f"--new-tokens {new_tokens} leaves no room for a prompt in the model's context "
                        f"of {cfg.max_seq_len} tokens")
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise PLDRError(f"token id {bad[0]} is outside the model's vocabulary ({cfg.vocab_size}); were the "
                        f"prompts tokenized with this model's tokenizer?")


def measure_criticality(model, prompts: list[list[int]], protocol: Protocol, *,
                        progress: Progress = _no_progress) -> CriticalityResult:
    """The order parameter and the per-head diagnostics of ``model`` on ``prompts`` (token ids).

    Prompts are cut to ``max_prompt_tokens`` (and to the context left after ``new_tokens``). Every
    read-out is one uncached forward pass of one sample (A sums over every position, so no padding).
    """
    protocol.check()
    if not prompts:
        raise PLDRError("no prompts to measure")
    model.eval()
    cfg = model.config
    _check_fits(model, prompts, protocol.new_tokens)
    limit = min(protocol.max_prompt_tokens, cfg.max_seq_len - protocol.new_tokens)
    prompts = [list(p[:limit]) for p in prompts[:protocol.samples]]
    device = next(model.parameters()).device
    protocol.g_mode, protocol.rope_style = cfg.g_mode.value, cfg.rope_style
    protocol.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    protocol.device = str(device)
    progress("sampling runs 1 and 2", 0, len(prompts))
    run1, run2 = sample_runs(model, prompts, new_tokens=protocol.new_tokens, top_p=protocol.top_p,
                             temperature=protocol.temperature, seed=protocol.seed,
                             compile=device.type == "cuda")
    order = OrderAccumulator(cfg.num_layers, device)
    heads, spectra, drift = HeadAccumulator(), HeadAccumulator(), DriftAccumulator()
    for n, (p, r1, r2) in enumerate(zip(prompts, run1, run2)):
        progress("reading out", n, len(prompts))
        o1 = readout(model, p + r1, diagnostics=True)
        oC = readout(model, p)
        order.add(o1.tensors, readout(model, p + r2).tensors, oC.tensors)
        figs = head_figures(o1, cfg.rope_style)
        heads.add({k: figs[k] for k in PER_HEAD})
        spectra.add({k: v for k, v in figs.items() if k in SPECTRA})
        if cfg.has_metric_path:
            for t in range(1, min(protocol.drift_tokens, len(r1)) + 1):
                G_t = o1.tensors["G_LM"] if t == len(r1) else readout(model, p + r1[:t]).tensors["G_LM"]
                drift.add(t, G_t, oC.tensors["G_LM"])
    progress("reading out", len(prompts), len(prompts))
    notes = []
    if len(prompts) < protocol.samples:
        notes.append(f"{len(prompts)} prompt(s) available, fewer than the {protocol.samples} asked for")
    if not cfg.has_metric_path:
        notes.append(f"g_mode {cfg.g_mode.value}: G_LM does not depend on the input, so OP(G_LM) is 0 by "
                     f"definition; A is q^T q / S of the post-RoPE queries (the model has no "
                     f"metric path)" + ("; G_LM is the identity" if cfg.g_mode.value == "identity" else ""))
    return CriticalityResult(
        protocol=protocol, order_parameter=order.order_parameter("1C"),
        order_parameter_12=order.order_parameter("12"), stats=order.stats(), per_layer=order.per_layer(),
        per_head=heads.rows(PER_HEAD), eps_G=drift.rows(), spectra=spectra.rows(SPECTRA),
        samples=[Sample(p, r1, r2) for p, r1, r2 in zip(prompts, run1, run2)], notes=notes)


@dataclass
class ProbeResult:
    """What ``criticality_probe`` returns (a few floats, for metrics.jsonl and a progress line)."""

    op_G_LM: float
    op_A: float
    per_layer_G_LM: list[float]
    per_layer_A: list[float]
    samples: int

    def to_dict(self) -> dict:
        return {"op_G_LM": self.op_G_LM, "op_A": self.op_A, "op_G_LM_per_layer": self.per_layer_G_LM,
                "op_A_per_layer": self.per_layer_A, "criticality_samples": self.samples}


@torch.no_grad()
def criticality_probe(model, rows, new_tokens: int = 64, *, prompts: int = 8, prompt_tokens: int = 64,
                      top_p: float = 0.8, temperature: float = 1.0, seed: int = 0) -> ProbeResult:
    """OP(G_LM), OP(A) and their per-layer values from ``prompts`` of ``rows`` (validation rows [n, S],
    any int array), each cut to ``prompt_tokens``: run 1 only against run C, eager decoding, no
    diagnostics. Leaves the model's train/eval mode as it found it."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise PLDRError("criticality_probe needs validation rows [n, S]")
    cfg = model.config
    _check_fits(model, [], new_tokens)
    limit = max(1, min(prompt_tokens, cfg.max_seq_len - new_tokens, rows.shape[1]))
    ids = [[int(t) for t in r[:limit]] for r in rows[:prompts]]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        sampler = Sampler(temperature=temperature, top_k=None, top_p=top_p, seed=seed)
        run1 = [[] for _ in ids]
        for tok in generate(model, ids, max_new_tokens=new_tokens, kv_cache=True, g_cache=False,
                            sampler=sampler, eos_id=cfg.eos_id):
            run1[tok.row].append(tok.id)
        order = OrderAccumulator(cfg.num_layers, device)
        for p, r1 in zip(ids, run1):
            t1, tC = readout(model, p + r1).tensors, readout(model, p).tensors
            order.add(t1, t1, tC)
    finally:
        model.train(was_training)
    op, layers = order.order_parameter("1C"), order.per_layer()
    nan = float("nan")
    return ProbeResult(op_G_LM=0.0 if not cfg.has_metric_path else op.get("G_LM", nan),
                       op_A=op.get("A", nan),
                       per_layer_G_LM=[row["order_parameter"].get("G_LM", nan) for row in layers],
                       per_layer_A=[row["order_parameter"].get("A", nan) for row in layers],
                       samples=len(ids))
