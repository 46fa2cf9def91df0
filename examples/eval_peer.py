#!/usr/bin/env python
"""Zero-shot scoring speed against the general tools: our `pldr eval` (``run_eval``) on a PLDR model of
a preset's shape and lm-eval's own `hf` model on a Hugging Face Llama of the same shape, both with
random weights (a speed comparison), the same tasks, limit, batch size and device, one after the other.

Both are timed alike (``pldr_core.evaluate.RequestTimer``: loglikelihood requests and the seconds spent
scoring them, tokenizing included); both score in float32, as `pldr eval` does. The Llama gets our
SentencePiece pieces and scores as a tokenizers Unigram model, so both see the same tokens. With
--gcache, ours is also timed with a G-cache file from the EOS prompt (then its batches pad as the hf
model's do; without, a learned-G model batches only windows of one length).

    python examples/eval_peer.py --preset tiny --tasks tests/data/tiny_mc.yaml --limit 4 --device cpu
    python examples/eval_peer.py --preset paper-110m --tasks pldr_zeroshot --batch-size 64 \\
        --device cuda --tokenizer data/tok32k/tokenizer.model --gcache --json eval_peer.json

--tokenizer: a SentencePiece model (default: one trained on the embedded corpus at the preset's vocabulary).
Needs transformers and accelerate (`pip install -e ".[peer]"`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pldr_core.bench_peer import llama_config
from pldr_core.build import init_model_dir
from pldr_core.config import preset as make_preset
from pldr_core.corpus import iter_embedded_documents
from pldr_core.evaluate import RequestTimer, prepared_tasks, run_eval, score_rows
from pldr_core.gcache_export import export_gcache_file
from pldr_core.tasks import expand_tasks
from pldr_core.tokenizer import Tokenizer, train_tokenizer


def hf_tokenizer(transformers, spm_file: Path):
    """Our SentencePiece model as a ``tokenizers`` Unigram (same pieces, scores and ids; nmt_nfkc's
    NFKC and whitespace folding, split digits, byte fallback), wrapped for ``from_pretrained``."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    sp = Tokenizer(spm_file).sp
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = RustTokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=sp.id_to_piece(sp.unk_id()), bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()), pad_token=sp.id_to_piece(sp.pad_id()))


def build_models(transformers, preset: str, spm_file: Path, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random PLDR model directory and a random same-shape Llama directory (config, weights, tokenizer)."""
    config = make_preset(preset)
    pldr_dir, _ = init_model_dir(preset=preset, out=work / "pldr", tokenizer=spm_file,
                                 vocab_size=config.vocab_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama = transformers.LlamaForCausalLM(llama_config(transformers, config, config.max_seq_len))
    hf_dir = work / "hf-llama"
    llama.save_pretrained(hf_dir)
    hf_tokenizer(transformers, spm_file).save_pretrained(hf_dir)
    return Path(pldr_dir), hf_dir


def time_hf(hf_dir: Path, args) -> dict:
    """lm-eval's `hf` model built from its registry as ``simple_evaluate(model="hf", model_args=...)``
    builds it, then run by ``simple_evaluate`` over our prepared tasks, timed by ``RequestTimer``."""
    import lm_eval.models  # noqa: F401  (registers lm-eval's own model names, "hf" among them)
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    t0 = time.perf_counter()
    lm = get_model("hf").create_from_arg_string(f"pretrained={hf_dir},dtype=float32",
                                                {"batch_size": args.batch_size, "device": args.device})
    timer = RequestTimer(lm)
    with prepared_tasks(expand_tasks(args.tasks), data_dir=args.data_dir,
                        offline=True if args.offline else None) as prep:
        results = simple_evaluate(model=lm, tasks=list(prep.tasks), task_manager=prep.task_manager,
                                  limit=args.limit, batch_size=args.batch_size, device=args.device,
                                  log_samples=False)
    return {**timer.figures(), "wall_s": round(time.perf_counter() - t0, 3), "scores": score_rows(results)}


def time_pldr(pldr_dir: Path, args, gcache: Path | None = None) -> dict:
    t0 = time.perf_counter()
    report = run_eval(pldr_dir, args.tasks, gcache=gcache, batch_size=args.batch_size, limit=args.limit,
                      device=args.device, data_dir=args.data_dir, offline=True if args.offline else None)
    return {**report.throughput, "wall_s": round(time.perf_counter() - t0, 3), "scores": report.rows()}


def ratio(ours: dict, peer: dict) -> float | None:
    if not ours.get("requests_per_s") or not peer.get("requests_per_s"):
        return None
    return round(ours["requests_per_s"] / peer["requests_per_s"], 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tasks", default="pldr_zeroshot", help="as `pldr eval --tasks`")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=float, help="examples per task (as `pldr eval --limit`)")
    ap.add_argument("--tokenizer", type=Path, help="SentencePiece model (default: trained here)")
    ap.add_argument("--gcache", action="store_true", help="also time ours with a G-cache file")
    ap.add_argument("--offline", action="store_true", help="local task data only (no hub probe)")
    ap.add_argument("--data-dir", type=Path, help="offline task data folder (as `pldr eval --data-dir`)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    import transformers  # here, so that --help answers without it

    with tempfile.TemporaryDirectory(prefix="pldr-eval-peer-") as tmp:
        work = Path(tmp)
        spm_file = args.tokenizer
        if spm_file is None:
            lines = (line for doc in iter_embedded_documents() for line in doc["text"].splitlines() if line)
            spm_file = train_tokenizer(lines, work / "tok", vocab_size=make_preset(args.preset).vocab_size)
        pldr_dir, hf_dir = build_models(transformers, args.preset, spm_file, work)
        out = {"preset": args.preset, "tasks": args.tasks, "batch_size": args.batch_size,
               "device": args.device, "limit": args.limit, "dtype": "float32",
               "transformers": transformers.__version__, "pldr": time_pldr(pldr_dir, args)}
        if args.gcache:
            g = work / "eos.gcache.safetensors"
            export_gcache_file(pldr_dir, g, device=args.device)
            out["pldr_gcache"] = time_pldr(pldr_dir, args, gcache=g)
        out["hf"] = time_hf(hf_dir, args)
    out["ratio_pldr_hf"] = ratio(out["pldr"], out["hf"])
    if args.gcache:
        out["ratio_pldr_gcache_hf"] = ratio(out["pldr_gcache"], out["hf"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    for name in ("pldr", "pldr_gcache", "hf"):
        if name in out:
            r = out[name]
            print(f"{name:12s} {r['requests']} requests in {r['scoring_s']:.2f} s: {r['requests_per_s']} "
                  f"requests/s")
    print(f"ratio ours/hf {out['ratio_pldr_hf']}"
          + (f", with the G-cache {out['ratio_pldr_gcache_hf']}" if args.gcache else ""))


if __name__ == "__main__":
    main()
