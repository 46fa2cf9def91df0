"""Can the metric path's matmuls run in TF32 (its GLUs' in bf16)? A CPU emulation against float64.

The metric path (A0 = q^T q -> LN_A -> residual GLU units -> A_LM -> A_P -> G_LM) runs in fp32, even
under bf16 autocast. This script asks what TF32 tensor cores would do to it, without a GPU: TF32 is
emulated by rounding every operand of the metric path's matmuls to TF32 (10 explicit mantissa bits,
round to nearest, ties away from zero) and multiplying in fp32, in the forward pass and in both
matmuls of each backward. TF32x3 (the "3xTF32" trick: a = hi + lo with both parts in TF32,
a @ b ~ hi_a @ hi_b + hi_a @ lo_b + lo_a @ hi_b) is emulated the same way, as is "bf16x2" (the same
split with bf16 parts, 16 significant bits), and so is "bf16": each
operand rounded to bfloat16 (7 explicit mantissa bits, round to nearest even), products and sums in
fp32. That is what the Triton GLU-stack kernels do with bf16 operands, so bf16 is only offered for
the ``glu`` placement; biases, LayerNorms and the residual adds stay fp32 in every mode.

The emulation runs inside the model's fused metric path (``MetricPath(fused=True, kernel="torch")``):
that path takes its matmuls from the layer's ``MetricPath`` (``matmul`` for q^T q and the chain,
``linear`` for the GLUs), so ``emulated_metric_path`` sets a ``MetricPath`` whose products are the
emulated ones on the model (same maths, same W1|W2 concatenation) and restores the previous setting
on exit. Nothing else in the model changes. Placements: ``glu`` (the LN_A residual units, i.e. what
the Triton GLU-stack kernels compute on a GPU), ``chain`` (W @ A and alpha @ A_P) and ``a0`` (q^T q).

It prints
  (a) gradient errors: one forward/backward on random tokens (next-token cross-entropy) for each
      setting, against the same weights in float64. "metric" are the metric path's parameters
      (mha1.layernorm1, mha1.reslayerAs, mha1.plgatt_layer), "other" everything else; errors are
      norm-wise relative, sqrt(sum |g - g64|^2 / sum |g64|^2) over the group; also the worst
      per-tensor max |g - g64| / max |g64| among the metric tensors and the cosine between the
      whole gradient and the float64 one. One sample's error is heavy-tailed (the metric path is
      ill-conditioned: A_LM ** P), so the table gives medians over --samples (weights, tokens) seeds.
  (b) with --steps > 0, training trajectories: the same initial model trained for --steps AdamW
      steps on the same batches in float64, fp32, and bf16 autocast with several metric precisions
      (train losses, |loss - float64 loss| per step, validation loss).

bf16 autocast here is CPU autocast (torch.autocast("cpu")), standing in for CUDA autocast; its op
lists are close but not identical. Everything runs on the CPU, in fp32 matmul precision "highest".

    PYTHONPATH=$PWD python scripts/metric_precision_study.py --steps 0       # (a) only, ~1 min
    PYTHONPATH=$PWD python scripts/metric_precision_study.py --data /tmp/emudata --steps 300

Without --data the training part first tokenizes the embedded corpus (vocab 4000, --seq-len) into a
temporary folder; ``python -m pldr_cli tokenize --out DIR --vocab-size 4000 --seq-len 128`` makes
one to reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pldr_core.build import build_model
from pldr_core.config import preset
from pldr_core.kernels import MetricPath

MODES = ("fp32", "tf32", "tf32x3", "bf16", "bf16x2")
GLU_ONLY_MODES = ("bf16",)  # modes the ``glu`` placement takes but ``chain`` and ``a0`` do not


# ---- TF32 / bf16 emulation -------------------------------------------------------------------------
def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32 (10 mantissa bits; nearest, ties away from zero), as fp32."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to bfloat16 (7 mantissa bits; nearest, ties to even), as fp32."""
    return x.float().to(torch.bfloat16).to(torch.float32)


def _split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = round_to_tf32(x)
    return hi, round_to_tf32(x - hi)


def _split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = round_to_bf16(x)
    return hi, round_to_bf16(x - hi)


def _product(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "tf32":
        return torch.matmul(round_to_tf32(a), round_to_tf32(b))
    if mode == "tf32x3":
        a_hi, a_lo = _split_tf32(a)
        b_hi, b_lo = _split_tf32(b)
        return torch.matmul(a_hi, b_hi) + (torch.matmul(a_hi, b_lo) + torch.matmul(a_lo, b_hi))
    if mode == "bf16":  # products of bf16 values are exact in fp32; the sums are fp32
        return torch.matmul(round_to_bf16(a), round_to_bf16(b))
    if mode == "bf16x2":  # as tf32x3 with bf16 parts: 16 significant bits per operand
        a_hi, a_lo = _split_bf16(a)
        b_hi, b_lo = _split_bf16(b)
        return torch.matmul(a_hi, b_hi) + (torch.matmul(a_hi, b_lo) + torch.matmul(a_lo, b_hi))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class _EmulatedMatmul(torch.autograd.Function):
    """a @ b (with broadcasting) whose forward and both backward matmuls use ``mode``'s operands."""

    @staticmethod
    def forward(ctx, a, b, mode):
        ctx.save_for_backward(a, b)
        ctx.mode = mode
        return _product(a, b, mode)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _product(grad, b.transpose(-1, -2), ctx.mode).sum_to_size(a.shape)
        grad_b = _product(a.transpose(-1, -2), grad, ctx.mode).sum_to_size(b.shape)
        return grad_a, grad_b, None


def matmul(a: torch.Tensor, b: torch.Tensor, mode: str = "fp32") -> torch.Tensor:
    """``torch.matmul(a, b)`` with its operands in ``mode`` ("fp32" is plain torch.matmul)."""
    if mode == "fp32":
        return torch.matmul(a, b)
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"{mode} emulation needs fp32 operands, got {a.dtype} and {b.dtype}")
    return _EmulatedMatmul.apply(a, b, mode)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mode: str = "fp32") -> torch.Tensor:
    """``F.linear`` as one GEMM over the flattened rows (as cuBLAS runs it), operands in ``mode``."""
    if mode == "fp32":
        return F.linear(x, weight, bias)
    y = matmul(x.reshape(-1, x.shape[-1]), weight.t(), mode) + bias
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- the metric path with emulated matmuls ---------------------------------------------------------
@dataclass(frozen=True)
class MetricPrecision:
    """Matmul precision per part of the metric path: "fp32", "tf32", "tf32x3" or "bf16x2"; ``glu``
    also "bf16"."""

    glu: str = "fp32"    # the GLUs of the LN_A residual units (the Triton GLU-stack kernels on CUDA)
    chain: str = "fp32"  # W @ A and alpha @ A_P (PLGAParams)
    a0: str = "fp32"     # A0 = q^T q

    def __post_init__(self):
        if self.glu not in MODES:
            raise ValueError(f"glu precision must be one of {MODES}, got {self.glu!r}")
        chain_modes = tuple(m for m in MODES if m not in GLU_ONLY_MODES)
        for part in (self.chain, self.a0):
            if part not in chain_modes:
                raise ValueError(f"chain/a0 precision must be one of {chain_modes}, got {part!r}")

    @classmethod
    def everywhere(cls, mode: str) -> "MetricPrecision":
        """``mode`` in all three placements (so not "bf16", which is for the GLUs only)."""
        return cls(glu=mode, chain=mode, a0=mode)


@dataclass
class EmulationStats:
    """What ``emulated_metric_path`` yields: ``calls`` counts the layers that ran the emulation."""

    calls: int = 0


@dataclass(frozen=True)
class _EmulatedPath(MetricPath):
    """The fused torch metric path with ``emulation``'s matmul operands; counts q^T q products."""

    emulation: MetricPrecision = MetricPrecision()
    stats: EmulationStats = None

    def matmul(self, a, b, part):
        if part == "a0":
            self.stats.calls += 1
        return matmul(a, b, self.emulation.a0 if part == "a0" else self.emulation.chain)

    def linear(self, x, weight, bias):
        return linear(x, weight, bias, self.emulation.glu)


@contextlib.contextmanager
def emulated_metric_path(model, precision: MetricPrecision | None):
    """Within the block, ``model`` runs its metric path on the fused torch formulation with
    ``precision``'s emulated matmuls; ``None`` leaves its own metric path in place. The previous
    setting is restored on exit."""
    stats = EmulationStats()
    if precision is None:
        yield stats
        return
    saved = model.metric_path
    model.set_metric_path(_EmulatedPath(fused=True, kernel="torch", emulation=precision, stats=stats))
    try:
        yield stats
    finally:
        model.set_metric_path(saved)


# ---- (a) gradient error against float64 -------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    label: str
    autocast: bool = False               # bf16 CPU autocast around the forward pass
    metric: MetricPrecision | None = None  # None: the real fp32 metric path


# TF32 everywhere: what ``--metric-precision tf32`` ran on CUDA before the q^T q backward became a
# 16-bit kernel (see BF16); it now runs that backward more precisely than emulated here.
TF32 = MetricPrecision.everywhere("tf32")
BF16_GLU = MetricPrecision(glu="bf16")
# What ``--metric-precision bf16`` (the default) runs on CUDA: bf16 GLUs, TF32 for W @ A and
# alpha @ A_P, and q^T q from the bf16 q (exact) with its backward q (g + g^T) from bf16 hi and lo
# parts (``pldr_core.kernels._gram_backward``): "bf16x2". Its split of the bf16 q is exact (no lo
# part); it splits g and g^T apart (autograd's two products) where the kernel splits their sum, which
# differs in the last of 16 bits only.
BF16 = MetricPrecision(glu="bf16", chain="tf32", a0="bf16x2")
GRADIENT_SETTINGS = (
    Setting("fp32"),
    Setting("TF32 everywhere in metric path", metric=TF32),
    Setting("TF32 GLU only", metric=MetricPrecision(glu="tf32")),
    Setting("TF32x3 GLU", metric=MetricPrecision(glu="tf32x3")),
    Setting("bf16 GLU only", metric=BF16_GLU),
    Setting("bf16 autocast + fp32 metric", autocast=True),
    Setting("bf16 autocast + TF32 metric", autocast=True, metric=TF32),
    Setting("bf16 autocast + bf16 GLU", autocast=True, metric=BF16_GLU),
    Setting("bf16 autocast + bf16 metric", autocast=True, metric=BF16),
)

_METRIC_PARAM = re.compile(r"\.mha1\.(layernorm1|reslayerAs|plgatt_layer)\.")


def is_metric_param(name: str) -> bool:
    return _METRIC_PARAM.search(name) is not None


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction (pad id 0 ignored), in fp32 (fp64 for fp64 logits)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                           ignore_index=0)


def make_fused(model):
    """``model`` with the torch formulation of the fused metric path (what the emulation replaces)."""
    if model.set_metric_path(MetricPath(fused=True, kernel="torch")) == 0:
        raise ValueError("the model has no learned metric path (g_mode must be 'learned')")
    return model


def gradients(model, tokens: torch.Tensor, setting: Setting, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Parameter gradients of a copy of ``model`` in ``dtype`` under ``setting`` (one fwd/bwd)."""
    m = make_fused(copy.deepcopy(model).to(dtype).train())
    with emulated_metric_path(m, setting.metric) as stats:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.autocast):
            loss = next_token_loss(m(tokens).logits, tokens)
        loss.backward()
    if setting.metric is not None and stats.calls != m.config.num_layers:
        raise RuntimeError(f"the emulated metric path ran {stats.calls} times, expected "
                           f"{m.config.num_layers}: does the fused path take its matmuls from the MetricPath?")
    return {name: p.grad.detach().double() for name, p in m.named_parameters()}


@dataclass
class GradError:
    metric: float        # norm-wise relative error of the metric path's gradients
    other: float         # ... of every other gradient
    worst_metric: float  # max over metric tensors of max |g - g64| / max |g64|
    cosine: float        # cosine between the whole gradient and the float64 one


def gradient_error(grads: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> GradError:
    sq_err = {True: 0.0, False: 0.0}
    sq_ref = {True: 0.0, False: 0.0}
    worst = dot = sq_grad = 0.0
    for name, ref in exact.items():
        diff = grads[name] - ref
        group = is_metric_param(name)
        sq_err[group] += diff.square().sum().item()
        sq_ref[group] += ref.square().sum().item()
        dot += (grads[name] * ref).sum().item()
        sq_grad += grads[name].square().sum().item()
        if group:
            worst = max(worst, (diff.abs().max() / ref.abs().max().clamp_min(1e-300)).item())
    return GradError(metric=(sq_err[True] / sq_ref[True]) ** 0.5,
                     other=(sq_err[False] / sq_ref[False]) ** 0.5,
                     worst_metric=worst, cosine=dot / (sq_grad * (sq_ref[True] + sq_ref[False])) ** 0.5)


def gradient_study(model, tokens: torch.Tensor, settings=GRADIENT_SETTINGS) -> dict[str, GradError]:
    """Each setting's gradient error against float64 (``model``'s weights, ``tokens``)."""
    exact = gradients(model, tokens, Setting("float64"), dtype=torch.float64)
    return {s.label: gradient_error(gradients(model, tokens, s), exact) for s in settings}


def print_gradient_table(samples: list[dict[str, GradError]]) -> None:
    """Medians over the samples (one sample's error is heavy-tailed), and the worst sample's metric error."""
    print(f"{'setting':32s} {'metric grads':>12s} {'(worst)':>9s} {'other grads':>12s} "
          f"{'worst tensor':>12s} {'cosine':>7s}")
    for label in samples[0]:
        errs = [s[label] for s in samples]
        med = {f: float(np.median([getattr(e, f) for e in errs]))
               for f in ("metric", "other", "worst_metric", "cosine")}
        print(f"{label:32s} {med['metric']:12.2e} {max(e.metric for e in errs):9.2e} {med['other']:12.2e} "
              f"{med['worst_metric']:12.2e} {med['cosine']:7.3f}")
    print("(medians over the samples. metric / other: norm-wise relative error of the metric path's / the\n"
          " other gradients; (worst): the largest metric error of a sample; worst tensor: max over metric\n"
          " tensors of max|g - g64| / max|g64|; cosine: between the whole gradient and the float64 one)")


# ---- (b) training trajectories ---------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    label: str
    dtype: torch.dtype
    autocast: bool = False
    metric: MetricPrecision | None = None


TRAINING_RUNS = (
    Run("float64", torch.float64),
    Run("fp32", torch.float32),
    Run("bf16 autocast + fp32 metric", torch.float32, autocast=True),
    Run("bf16 autocast + TF32 metric", torch.float32, autocast=True, metric=TF32),
    Run("bf16 autocast + TF32 GLU only", torch.float32, autocast=True, metric=MetricPrecision(glu="tf32")),
    Run("bf16 autocast + bf16 GLU", torch.float32, autocast=True, metric=BF16_GLU),
    Run("bf16 autocast + bf16 metric", torch.float32, autocast=True, metric=BF16),
)


def train(model, run: Run, train_rows: np.ndarray, batches: np.ndarray, val: torch.Tensor, *,
          lr: float = 1e-3, warmup: int = 20) -> tuple[np.ndarray, float, float]:
    """Train a copy of ``model`` on ``train_rows[batches[step]]``; (losses per step, val loss, seconds)."""
    m = make_fused(copy.deepcopy(model).to(run.dtype).train())
    opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    losses = []
    start = time.time()
    with emulated_metric_path(m, run.metric):
        for step, rows in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            x = torch.from_numpy(train_rows[rows].astype(np.int64))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.autocast):
                loss = next_token_loss(m(x).logits, x)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(m.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.autocast):
            val_loss = next_token_loss(m(val).logits, val).item()
    return np.array(losses), val_loss, time.time() - start


def training_study(data_dir: Path, preset_name: str, steps: int, batch: int, val_rows: int = 64) -> None:
    from pldr_core.data import TokenData

    data = TokenData(data_dir)
    print(f"\n(b) training trajectories: {preset_name} preset, {steps} AdamW steps of {batch} x "
          f"{data.seq_len} tokens, {data}")
    model = build_model(preset(preset_name, g_mode="learned", vocab_size=data.vocab_size,
                               max_seq_len=data.seq_len), seed=0)
    batches = np.random.default_rng(0).integers(0, data.train.shape[0], size=(steps, batch))
    val = torch.from_numpy(data.val[:val_rows].astype(np.int64))
    window = max(1, min(50, steps // 2))
    print(f"{'run':30s} {'first ' + str(window):>9s} {'last ' + str(window):>9s} "
          f"{'mean|d64|':>10s} {'max|d64|':>9s} {'val loss':>9s} {'time':>6s}", flush=True)
    exact = None
    for run in TRAINING_RUNS:
        losses, val_loss, seconds = train(model, run, data.train, batches, val)
        exact = losses if exact is None else exact  # the first run is float64
        d = np.abs(losses - exact)
        print(f"{run.label:30s} {losses[:window].mean():9.4f} {losses[-window:].mean():9.4f} "
              f"{d.mean():10.4f} {d.max():9.4f} {val_loss:9.4f} {seconds:5.0f}s", flush=True)
    print("(first/last N: mean train loss over the first/last N steps; "
          "|d64|: |loss - float64 loss| per step)")


def tokenize_embedded(out: Path, seq_len: int, vocab_size: int = 4000) -> Path:
    from pldr_core.data import tokenize_corpus

    print(f"tokenizing the embedded corpus (vocab {vocab_size}, seq len {seq_len}) into {out} ...",
          flush=True)
    tokenize_corpus([], out, vocab_size=vocab_size, seq_len=seq_len)
    return out


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset (default: small)")
    ap.add_argument("--steps", type=int, default=300,
                    help="training steps per run (default: 300); 0 skips the training part")
    ap.add_argument("--data", type=Path, help="token data folder for training (default: tokenize the "
                                              "embedded corpus into a temporary folder)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch, both parts (default: 8)")
    ap.add_argument("--seq-len", type=int, default=128,
                    help="sequence length of the gradient part and of the tokenization without --data")
    ap.add_argument("--samples", type=int, default=4,
                    help="gradient part: (initial weights, token batch) samples, seeds --seed.. (default: 4)")
    ap.add_argument("--seed", type=int, default=0, help="first seed of the gradient part's samples")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy "
                                                "machine)")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.batch < 1 or args.samples < 1:
        ap.error("--steps must be >= 0, --batch and --samples >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # plain fp32 is the baseline: no reduced-precision GEMMs

    print(f"(a) gradient error vs float64: {args.preset} preset, one forward/backward on {args.batch} x "
          f"{args.seq_len} random tokens, {args.samples} samples "
          f"(seeds {args.seed}..{args.seed + args.samples - 1})")
    start = time.time()
    cfg = preset(args.preset, g_mode="learned")
    samples = []
    for seed in range(args.seed, args.seed + args.samples):
        tokens = torch.randint(4, cfg.vocab_size, (args.batch, args.seq_len),
                               generator=torch.Generator().manual_seed(seed))
        samples.append(gradient_study(build_model(cfg, seed=seed), tokens))
    print_gradient_table(samples)
    print(f"({time.time() - start:.0f}s)", flush=True)

    if args.steps:
        if args.data is not None:
            training_study(args.data, args.preset, args.steps, args.batch)
        else:
            with tempfile.TemporaryDirectory(prefix="pldr-tokens-") as tmp:
                data = tokenize_embedded(Path(tmp) / "tokens", args.seq_len)
                training_study(data, args.preset, args.steps, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
