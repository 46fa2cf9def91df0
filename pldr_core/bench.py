"""Speed measurements behind ``pldr bench``: how every speed claim is made.

Training: tokens/s (and MFU on GPU) of learned-G against identity-G at the same shape and batch, a full
optimizer step each (bf16 autocast on GPU with fp32 master weights, AdamW, clipping by value).
Decoding: tokens/s at batch 1 and a larger batch for no cache, KV, KV+G from the prefill and KV+G from a
G-cache file, with the eager mechanism (``decode_steps``) and with the static-cache engine
(``pldr_core.engine``, compiled with CUDA graphs on GPU), identity-G in the same engine, and a
same-shape Hugging Face Llama on transformers' static cache as the general tools' peer.

Timings: warm-up first, ``torch.cuda.synchronize`` around every timed region, random token inputs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pldr_core.bench_peer import PEER_NAME, HFPeer, load_transformers
from pldr_core.build import build_model
from pldr_core.cache import GCache
from pldr_core.checkpoint import fingerprint
from pldr_core.config import PLDRConfig
from pldr_core.config import preset as make_preset
from pldr_core.device import resolve_device
from pldr_core.engine import DecodeEngine
from pldr_core.errors import PLDRError
from pldr_core.gcache import read_gcache, write_gcache
from pldr_core.generate import decode_steps
from pldr_core.kernels import DEFAULT_METRIC_PRECISION, check_metric_precision, optimize_for_training
from pldr_core.model import cast_for_inference

# Dense bf16 peak of the chips we know (for MFU), by a lower-case part of the device name; others
# report MFU as null.
PEAK_BF16_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12}

WHATS = ("train", "decode", "all")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def peak_flops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev).lower()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def train_flops_per_token(config: PLDRConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), from the shapes.

    Linear layers: 2 per weight per token (embedding lookups excluded). Causal attention: 2 * 2 * S/2 * d
    per layer (scores and the weighted sum over on average S/2 keys). Metric path (learned-G), per
    sequence and layer: A0 = q^T q (2 S H dk^2), the residual GLU stack on H*dk rows, W@A and alpha@A_P
    (2 * 2 H dk^3), and q @ G_LM (2 S H dk^2); divided by S to count it per token.
    """
    d, L, H, dk, V = config.d_model, config.num_layers, config.num_heads, config.head_dim, config.vocab_size
    linear = L * (4 * d * d + 3 * d * config.dff) + d * V
    fwd = 2 * linear + L * 2 * seq_len * d
    if config.has_metric_path:
        glu = 3 * dk * config.A_dff
        per_seq = 2 * seq_len * H * dk * dk + 2 * H * dk * glu * config.num_reslayerA * config.num_denseA
        per_seq += 4 * H * dk ** 3 + 2 * seq_len * H * dk * dk
        fwd += L * per_seq / seq_len
    elif config.has_frozen_g:
        fwd += L * 2 * H * dk * dk
    return 3.0 * fwd


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _build(config: PLDRConfig, dev: torch.device, seed: int):
    return build_model(config, seed=seed).to(dev)


# ---- training ---------------------------------------------------------------------------------------
def bench_train_one(config: PLDRConfig, dev: torch.device, *, batch: int, seq_len: int, steps: int,
                    warmup: int, compile: bool, compile_mode: str | None = None,
                    metric_precision: str = DEFAULT_METRIC_PRECISION, seed: int = 0) -> dict:
    """Tokens/s of full training steps for one model (``compile_mode``: torch.compile's mode)."""
    model = _build(config, dev, seed).train()
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            fused=cuda)
    fwd = (optimize_for_training(model, dev, mode=compile_mode, metric_precision=metric_precision)
           if compile else model)
    graphs = compile and compile_mode in ("reduce-overhead", "max-autotune")  # CUDA graph trees
    V = config.vocab_size

    def loss_fn(x, y):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = fwd(x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=config.pad_id)

    if compile:
        loss_fn = torch.compile(loss_fn, **({"mode": compile_mode} if compile_mode else {}))
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(4, V, (batch, seq_len + 1), generator=gen).to(dev)
    x, y = data[:, :-1], data[:, 1:]

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(dev)
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(dev)
    elapsed = time.perf_counter() - t0
    tokens = batch * seq_len * steps
    flops = train_flops_per_token(config, seq_len) * tokens
    peak = peak_flops(dev)
    result = {
        "tokens_per_s": tokens / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "tflops": flops / elapsed / 1e12,
        "mfu": (flops / elapsed / peak) if peak else None,
        "warmup_s": warm_s,
        "loss": float(loss.detach()),
        "params": model.num_params(),
    }
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return result


def bench_train(config: PLDRConfig, dev: torch.device, *, batch: int, seq_len: int, steps: int,
                warmup: int, compile: bool, compile_mode: str | None = None,
                metric_precision: str = DEFAULT_METRIC_PRECISION, log: Callable[[str], None] = lambda s: None) -> dict:
    # The fused Triton metric path comes with compile on CUDA; otherwise it is the eager fp32 path.
    fused = compile and dev.type == "cuda"
    out = {"batch": batch, "seq_len": seq_len, "steps": steps, "warmup": warmup, "compile": compile,
           "compile_mode": (compile_mode or "default") if compile else None,
           "metric_precision": metric_precision if fused else "fp32",
           "dtype": "bf16-autocast" if dev.type == "cuda" else "fp32"}
    for g_mode in ("learned", "identity"):
        log(f"train {g_mode}-G: batch {batch} x {seq_len}, {steps} steps" + (" (compiled)" if compile else ""))
        out[g_mode] = bench_train_one(config.replace(g_mode=g_mode), dev, batch=batch, seq_len=seq_len,
                                      steps=steps, warmup=warmup, compile=compile,
                                      compile_mode=compile_mode, metric_precision=metric_precision)
        if dev.type == "cuda":  # the model and optimizer went with bench_train_one's frame
            torch.cuda.empty_cache()
    out["ratio_learned_identity"] = out["learned"]["tokens_per_s"] / out["identity"]["tokens_per_s"]
    return out


# ---- decoding ---------------------------------------------------------------------------------------
def _timed(dev, fn, new_tokens: int, batch: int) -> dict:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": batch * new_tokens / elapsed, "seconds": elapsed}


def _file_gcache(model, tmp: Path):
    """Export a G-cache file from the EOS-alone prompt (export-gcache's default) and read it back."""
    dev = next(model.parameters()).device
    gc = GCache.for_model(model, 1)
    with torch.no_grad():
        model(torch.tensor([[model.config.eos_id]], device=dev), g_cache=gc)
    path = write_gcache(tmp / "bench.gcache.safetensors", gc.A_LM[:, 0], gc.G_LM[:, 0],
                        fingerprint=fingerprint(model),
                        how={"prompts": [""], "count": 1, "reduction": "first"})
    return read_gcache(path, model=model).to(device=dev)


def _eager_row(learned, identity, gfile, prompt, new_tokens: int, dev, log) -> dict:
    """One timing per eager ``decode_steps`` mechanism, after a short warm-up."""
    cases = {
        "no_cache": (learned, dict(kv_cache=False, g_cache=False)),
        "kv": (learned, dict(kv_cache=True, g_cache=False)),
        "kv_g_prefill": (learned, dict(kv_cache=True, g_cache=True)),
        "kv_g_file": (learned, dict(kv_cache=True, g_cache=gfile)),
        "identity_kv": (identity, dict(kv_cache=True, g_cache=False)),
    }
    B, S = prompt.shape
    row = {}
    for name, (model, kw) in cases.items():
        log(f"decode eager {name}: batch {B}, {S}+{new_tokens} tokens")
        for _ in decode_steps(model, prompt, 2, **kw):  # warm-up
            pass
        row[name] = _timed(dev, lambda: [None for _ in decode_steps(model, prompt, new_tokens, **kw)],
                           new_tokens, B)
    return row


def _warm(decoder, prompt, new_tokens: int, dev) -> float:
    """Warm a decoder up (compile, record its graphs): two short runs; returns their seconds."""
    t0 = time.perf_counter()
    decoder.generate(prompt, min(new_tokens, 8))
    decoder.generate(prompt, min(new_tokens, 8))
    _sync(dev)
    return time.perf_counter() - t0


def _take_turns(decoders: dict, prompt, new_tokens: int, repeats: int, dev) -> tuple[dict, dict]:
    """One generate is short on a GPU, so single timings are noisy: the decoders take turns, and each
    figure is the median of its turns. Returns ({name: median figures}, {name: last tokens})."""
    runs: dict[str, list[dict]] = {name: [] for name in decoders}
    toks = {}
    B = prompt.shape[0]
    for _ in range(repeats):
        for name, dec in decoders.items():
            def run(name=name, dec=dec):
                toks[name] = dec.generate(prompt, new_tokens)
            runs[name].append(_timed(dev, run, new_tokens, B))
    medians = {}
    for name, rs in runs.items():
        speeds = sorted(r["tokens_per_s"] for r in rs)
        medians[name] = dict(tokens_per_s=statistics.median(speeds),
                             seconds=statistics.median(r["seconds"] for r in rs), runs_tokens_per_s=speeds)
    return medians, toks


def bench_decode(config: PLDRConfig, dev: torch.device, *, batches: list[int], prompt_len: int,
                 new_tokens: int, compile: bool, eager: bool = True, repeats: int = 5, peer: bool = True,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Decoding tokens/s per mechanism (eager: one timing each; engine: the median of ``repeats``
    interleaved timings), the G-cache-file / identity-G ratios and, with ``peer``, a same-shape Hugging
    Face Llama on transformers' static cache timed in the same turns (``pldr_core.bench_peer``)."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    learned = cast_for_inference(_build(config.replace(g_mode="learned"), dev, 0), dtype).eval()
    identity = cast_for_inference(_build(config.replace(g_mode="identity"), dev, 0), dtype).eval()
    out = {"prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", ""),
           "compile": compile, "batches": list(batches), "engine_repeats": repeats}
    has_peer = peer and load_transformers() is not None
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        gfile = _file_gcache(learned, Path(tmp))
        for B in batches:
            prompt = torch.randint(4, config.vocab_size, (B, prompt_len), generator=gen).to(dev)
            row: dict = {}
            if eager:
                row["eager"] = _eager_row(learned, identity, gfile, prompt, new_tokens, dev, log)
            engines = {} if compile else {"kv": (learned, dict(g_source="none"))}
            engines.update({
                "kv_g_prefill": (learned, dict(g_source="prefill")),
                "kv_g_file": (learned, dict(g_source="file", g_cache=gfile)),
                "identity_kv": (identity, dict(g_source="none")),
            })
            row["engine"] = {}
            built = {}
            for name, (model, kw) in engines.items():
                log(f"decode engine {name}: batch {B}" + (" (compiling)" if compile else ""))
                built[name] = DecodeEngine(model, batch=B, max_len=prompt_len + new_tokens, compile=compile,
                                           **kw)
                row["engine"][name] = {"warmup_s": _warm(built[name], prompt, new_tokens, dev),
                                       "kernel": built[name].kernel}
            if has_peer:
                log(f"decode peer {PEER_NAME}: batch {B}" + (" (compiling)" if compile else ""))
                hf = HFPeer(config, dev, dtype, max_len=prompt_len + new_tokens, compile=compile)
                row["peer"] = {"name": PEER_NAME, "transformers": hf.version, "params": hf.params,
                               "warmup_s": _warm(hf, prompt, new_tokens, dev)}
                built[PEER_NAME] = hf
            elif peer:
                row["peer"] = {"skipped": "transformers is not installed"}
            medians, toks = _take_turns(built, prompt, new_tokens, repeats, dev)
            reference = None
            for name, (model, _) in engines.items():
                row["engine"][name].update(medians[name])
                if model is learned and name != "kv_g_file":
                    # KV alone and KV+G (prefill) give the same greedy tokens; in bf16
                    # a late near-tie can flip, so this is reported, not asserted. (A file's G comes
                    # from another prompt, so its tokens may differ.)
                    if reference is None:
                        reference = toks[name]
                    row["engine"][name]["same_tokens_as_first"] = bool((toks[name] == reference).all())
            del built
            ident = row["engine"]["identity_kv"]["tokens_per_s"]
            gfile_speed = row["engine"]["kv_g_file"]["tokens_per_s"]
            row["ratio_gfile_identity"] = gfile_speed / ident
            if eager:
                row["ratio_gfile_identity_eager"] = (row["eager"]["kv_g_file"]["tokens_per_s"]
                                                     / row["eager"]["identity_kv"]["tokens_per_s"])
            if has_peer:
                row["peer"].update(medians[PEER_NAME])
                row["ratio_identity_peer"] = ident / medians[PEER_NAME]["tokens_per_s"]
                row["ratio_gfile_peer"] = gfile_speed / medians[PEER_NAME]["tokens_per_s"]
            out[f"batch_{B}"] = row
    return out


# ---- the whole run ----------------------------------------------------------------------------------
def defaults_for(dev: torch.device, config: PLDRConfig) -> dict:
    if dev.type == "cuda":
        # reduce-overhead (CUDA graphs): the fastest training mode for both models at the paper shape.
        return dict(batch=16, seq_len=min(1024, config.max_seq_len), steps=20, warmup=5, compile=True,
                    compile_mode="reduce-overhead", decode_batch=16, prompt_len=32, new_tokens=256,
                    # 15 turns: single timings at batch 1 scatter by a few percent; the median settles.
                    decode_repeats=15)
    return dict(batch=4, seq_len=min(64, config.max_seq_len), steps=3, warmup=1, compile=False,
                decode_batch=4, prompt_len=8, new_tokens=16, decode_repeats=2)


def run_bench(what: str = "all", *, preset: str = "tiny", device: str = "auto", batch: int | None = None,
              seq_len: int | None = None, steps: int | None = None, compile: bool | None = None,
              compile_mode: str | None = None, metric_precision: str = DEFAULT_METRIC_PRECISION,
              decode_batch: int | None = None, prompt_len: int | None = None,
              new_tokens: int | None = None, eager_decode: bool = True, repeats: int | None = None,
              peer: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the benchmark; returns {"train": ..., "decode": ..., "device": ..., "torch": ...}."""
    if what not in WHATS:
        raise PLDRError(f"unknown benchmark {what!r}; choose one of {', '.join(WHATS)}")
    check_metric_precision(metric_precision)
    if compile_mode not in COMPILE_MODES:
        raise PLDRError(f"unknown --compile-mode {compile_mode!r}; choose one of "
                        f"{', '.join(m for m in COMPILE_MODES if m)}")
    for name, value in (("--batch", batch), ("--seq-len", seq_len), ("--steps", steps),
                        ("--decode-batch", decode_batch), ("--prompt-len", prompt_len),
                        ("--new-tokens", new_tokens), ("--repeats", repeats)):
        if value is not None and value < 1:
            raise PLDRError(f"{name} must be a positive integer, got {value}")
    config = make_preset(preset)
    dev = resolve_device(device)
    d = defaults_for(dev, config)
    batch = batch or d["batch"]
    seq_len = seq_len or d["seq_len"]
    if seq_len > config.max_seq_len:
        raise PLDRError(f"--seq-len {seq_len} exceeds the preset's context of {config.max_seq_len}")
    compile = d["compile"] if compile is None else compile
    compile_mode = compile_mode or d.get("compile_mode")
    prompt_len = prompt_len or d["prompt_len"]
    new_tokens = new_tokens or d["new_tokens"]
    if prompt_len + new_tokens > config.max_seq_len:
        raise PLDRError(f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceed the preset's context "
                        f"of {config.max_seq_len}")
    result = {"device": device_name(dev), "torch": torch.__version__, "preset": preset,
              "config": {k: v for k, v in config.to_dict().items() if k not in ("dag", "g_source")}}
    if what in ("train", "all"):
        result["train"] = bench_train(config, dev, batch=batch, seq_len=seq_len, steps=steps or d["steps"],
                                      warmup=d["warmup"], compile=compile, compile_mode=compile_mode,
                                      metric_precision=metric_precision, log=log)
    if what in ("decode", "all"):
        batches = sorted({1, decode_batch or d["decode_batch"]})
        result["decode"] = bench_decode(config, dev, batches=batches, prompt_len=prompt_len,
                                        new_tokens=new_tokens, compile=compile, eager=eager_decode,
                                        repeats=repeats or d["decode_repeats"], peer=peer, log=log)
    return result
