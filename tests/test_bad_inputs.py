"""Every command against a catalogue of bad inputs: exit 2, one line naming the file or option, no
traceback, nothing new on disk."""

from __future__ import annotations

import fractions
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(48)


class Workspace:
    """A test's tmp folder with helpers that make bad inputs out of the shared good ones."""

    def __init__(self, tmp: Path, model: Path, gcache: Path, data: Path, spm: Path):
        self.tmp, self.model, self.gcache, self.data, self.spm = tmp, model, gcache, data, spm
        self.out = tmp / "out"

    def file(self, name: str, content: bytes | str = b"") -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def png(self, name: str) -> Path:
        return self.file(name, PNG)

    def pickle(self, name: str) -> Path:
        return self.file(name, pickle.dumps({"model_state_dict": fractions.Fraction(1, 3)}))

    def model_copy(self, name: str = "m") -> Path:
        dest = self.tmp / name
        shutil.copytree(self.model, dest)
        return dest

    def model_with_config(self, data=None, raw: str | None = None, drop: str | None = None, **changes) -> Path:
        m = self.model_copy()
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(changes)
        cfg.pop(drop, None)
        (m / "config.json").write_text(raw if raw is not None else json.dumps(cfg if data is None else data))
        return m

    def model_with_weights(self, content: bytes | None = None, truncate: int = 0) -> Path:
        m = self.model_copy()
        f = m / "model.safetensors"
        if content is not None:
            f.write_bytes(content)
        if truncate:
            f.write_bytes(f.read_bytes()[:-truncate])
        return m

    def model_without(self, name: str) -> Path:
        m = self.model_copy()
        (m / name).unlink()
        return m

    def gcache_of_shape(self, layers: int, heads: int, dk: int, name: str = "other.safetensors") -> Path:
        from pldr_core.gcache import write_gcache

        G = torch.randn(layers, heads, dk, dk)
        return write_gcache(self.tmp / name, G.clone(), G, fingerprint="0" * 16)

    def data_with(self, meta=None, truncate: str | None = None) -> Path:
        d = self.tmp / "data"
        shutil.copytree(self.data, d)
        if meta is not None:
            (d / "meta.json").write_text(json.dumps(meta))
        if truncate:
            (d / truncate).write_bytes((d / truncate).read_bytes()[:-3])
        return d

    def text(self, name: str = "corpus.txt") -> Path:
        return self.file(name, "the whale sailed the grey sea. " * 400)


# (id, build(w) -> (args, needle)); needle must appear in the one output line.
INIT = [
    ("init-preset", lambda w: (["init", "--preset", "huge", "--out", w.out], "huge")),
    ("init-g-mode", lambda w: (["init", "--g-mode", "banana", "--out", w.out], "g_mode")),
    ("init-fixed-no-file", lambda w: (["init", "--g-mode", "fixed", "--out", w.out], "--g-file")),
    ("init-g-file-missing", lambda w: (["init", "--g-mode", "fixed", "--g-file", w.tmp / "no.safetensors",
                                        "--out", w.out], "no.safetensors")),
    ("init-g-file-png", lambda w: (["init", "--g-mode", "fixed", "--g-file", w.png("g.safetensors"),
                                    "--out", w.out], "g.safetensors")),
    ("init-g-file-shape", lambda w: (["init", "--g-mode", "fixed", "--g-file", w.gcache_of_shape(3, 2, 16),
                                      "--out", w.out], "other.safetensors")),
    ("init-tokenizer-missing", lambda w: (["init", "--tokenizer", w.tmp / "no.model", "--out", w.out],
                                          "no.model")),
    ("init-tokenizer-png", lambda w: (["init", "--tokenizer", w.png("t.model"), "--out", w.out], "t.model")),
    ("init-vocab-0", lambda w: (["init", "--vocab-size", 0, "--out", w.out], "vocab")),
    ("init-vocab-neg", lambda w: (["init", "--vocab-size", -1, "--out", w.out], "vocab")),
    ("init-vocab-below-tokenizer", lambda w: (["init", "--tokenizer", w.spm, "--vocab-size", 10, "--out",
                                               w.out], "vocab")),
    ("init-out-is-file", lambda w: (["init", "--out", w.file("taken", "x")], "taken")),
    ("init-g-file-not-fixed", lambda w: (["init", "--g-file", w.gcache, "--out", w.out], "--g-file")),
    ("init-out-under-file", lambda w: (["init", "--out", w.file("taken", "x") / "m"], "taken")),
]

INFO = [
    ("info-missing", lambda w: (["info", w.tmp / "nope"], "nope")),
    ("info-empty-dir", lambda w: (["info", (w.tmp / "empty").mkdir() or w.tmp / "empty"], "config.json")),
    ("info-config-list", lambda w: (["info", w.model_with_config(data=[1, 2])], "config.json")),
    ("info-config-empty", lambda w: (["info", w.model_with_config(raw="")], "config.json")),
    ("info-config-garbage", lambda w: (["info", w.model_with_config(raw="{nope")], "config.json")),
    ("info-config-no-heads", lambda w: (["info", w.model_with_config(drop="num_heads")], "num_heads")),
    ("info-config-nan", lambda w: (["info", w.model_with_config(raw=(w.model / "config.json").read_text()
                                                                .replace('"rope_base": 10000.0',
                                                                         '"rope_base": NaN'))], "rope_base")),
    ("info-config-inf-eps", lambda w: (["info", w.model_with_config(layer_norm_eps=float("inf"))],
                                       "layer_norm_eps")),
    ("info-config-neg-layers", lambda w: (["info", w.model_with_config(num_layers=-1)], "num_layers")),
    ("info-config-float-heads", lambda w: (["info", w.model_with_config(num_heads=2.5)], "num_heads")),
    ("info-config-eos-range", lambda w: (["info", w.model_with_config(eos_id=10**6)], "eos_id")),
    ("info-weights-missing", lambda w: (["info", w.model_without("model.safetensors")], "model.safetensors")),
    ("info-weights-empty", lambda w: (["info", w.model_with_weights(b"")], "model.safetensors")),
    ("info-weights-png", lambda w: (["info", w.model_with_weights(PNG)], "model.safetensors")),
    ("info-weights-truncated", lambda w: (["info", w.model_with_weights(truncate=64)], "truncated")),
    ("info-weights-shape", lambda w: (["info", w.model_with_config(vocab_size=500)], "model.safetensors")),
    ("info-pth-pickle", lambda w: (["info", w.pickle("ckpt.pth")], "ckpt.pth")),
    ("info-pth-png", lambda w: (["info", w.png("ckpt.pth")], "ckpt.pth")),
    ("info-not-pth", lambda w: (["info", w.file("model.bin", b"x")], "model.bin")),
    ("info-g-mode-alone", lambda w: (["info", w.model, "--g-mode", "identity"], "--g-mode")),
    ("info-both", lambda w: (["info", w.model, "--preset", "tiny"], "--preset")),
    ("info-config-is-dir", lambda w: (["info", (w.model_without("config.json") / "config.json").mkdir()
                                       or w.tmp / "m"], "config.json")),
    ("info-hf-bad-g-type", lambda w: (["info", w.model_with_config(model_type="pldrllm", custom_G_type="odd")],
                                      "custom_G_type")),
    ("info-config-dag-nan", lambda w: (["info", w.model_with_config(dag=[float("nan"), 0, 0])], "dag")),
]

DOCTOR = [
    ("doctor-missing", lambda w: (["doctor", w.tmp / "nope"], "nope")),
    ("doctor-not-a-model", lambda w: (["doctor", w.file("x.txt", "x")], "x.txt")),
    ("doctor-config-list", lambda w: (["doctor", w.model_with_config(data=[1])], "config.json")),
]

# doctor reports problems as rows of its table (exit 2): needle must appear in the output
DOCTOR_TABLE = [
    ("doctor-weights-truncated", lambda w: (["doctor", w.model_with_weights(truncate=64)], "truncated")),
    ("doctor-weights-png", lambda w: (["doctor", w.model_with_weights(PNG)], "not a safetensors")),
    ("doctor-tokenizer-png", lambda w: (["doctor", (w.model_copy() / "tokenizer.model").write_bytes(PNG)
                                         and w.tmp / "m"], "SentencePiece")),
    ("doctor-meta-list", lambda w: (["doctor", (w.model_copy() / "meta.json").write_text("[") and w.tmp / "m"],
                                    "meta.json")),
    ("doctor-gcache-missing", lambda w: (["doctor", w.model, "--gcache", w.tmp / "g.safetensors"],
                                         "not found")),
    ("doctor-gcache-png", lambda w: (["doctor", w.model, "--gcache", w.png("g.safetensors")], "g.safetensors")),
    ("doctor-gcache-shape", lambda w: (["doctor", w.model, "--gcache", w.gcache_of_shape(2, 4, 8)],
                                       "other.safetensors")),
    ("doctor-gcache-is-weights", lambda w: (["doctor", w.model, "--gcache", w.model / "model.safetensors"],
                                            "not a pldr G-cache")),
]

TOKENIZE = [
    ("tok-missing", lambda w: (["tokenize", w.tmp / "no.txt", "--out", w.out], "no.txt")),
    ("tok-png-as-txt", lambda w: (["tokenize", w.png("img.txt"), "--out", w.out, "--tokenizer", w.spm],
                                  "img.txt")),
    ("tok-empty", lambda w: (["tokenize", w.file("e.txt"), "--out", w.out, "--tokenizer", w.spm], "e.txt")),
    ("tok-jsonl-garbage", lambda w: (["tokenize", w.file("c.jsonl", "{nope\n"), "--out", w.out, "--tokenizer",
                                      w.spm], "c.jsonl")),
    ("tok-jsonl-column", lambda w: (["tokenize", w.file("c.jsonl", '{"body": "x"}\n'), "--out", w.out,
                                     "--tokenizer", w.spm], "--text-column")),
    ("tok-parquet-png", lambda w: (["tokenize", w.png("c.parquet"), "--out", w.out, "--tokenizer", w.spm],
                                   "c.parquet")),
    ("tok-seq-0", lambda w: (["tokenize", w.text(), "--out", w.out, "--seq-len", 0], "--seq-len")),
    ("tok-seq-neg", lambda w: (["tokenize", w.text(), "--out", w.out, "--seq-len", -5], "--seq-len")),
    ("tok-val-nan", lambda w: (["tokenize", w.text(), "--out", w.out, "--val-fraction", "nan"], "--val-fraction")),
    ("tok-val-inf", lambda w: (["tokenize", w.text(), "--out", w.out, "--val-fraction", "inf"], "--val-fraction")),
    ("tok-val-1", lambda w: (["tokenize", w.text(), "--out", w.out, "--val-fraction", 1], "--val-fraction")),
    ("tok-val-neg", lambda w: (["tokenize", w.text(), "--out", w.out, "--val-fraction", -0.1], "--val-fraction")),
    ("tok-vocab-0", lambda w: (["tokenize", w.text(), "--out", w.out, "--vocab-size", 0], "--vocab-size")),
    ("tok-tokenizer-png", lambda w: (["tokenize", w.text(), "--out", w.out, "--tokenizer", w.png("t.model")],
                                     "t.model")),
    ("tok-tokenizer-missing", lambda w: (["tokenize", w.text(), "--out", w.out, "--tokenizer",
                                          w.tmp / "t.model"], "t.model")),
    ("tok-out-is-file", lambda w: (["tokenize", w.text(), "--out", w.file("taken", "x"), "--tokenizer", w.spm],
                                   "taken")),
    ("tok-encoding", lambda w: (["tokenize", w.text(), "--out", w.out, "--encoding", "nope"], "--encoding")),
    ("tok-errors", lambda w: (["tokenize", w.text(), "--out", w.out, "--errors", "nope"], "--errors")),
    ("tok-latin1", lambda w: (["tokenize", w.file("l.txt", "caf\xe9 ".encode("latin-1") * 500), "--out", w.out,
                               "--tokenizer", w.spm], "l.txt")),
    ("tok-tokenizer-dir", lambda w: (["tokenize", w.text(), "--out", w.out, "--tokenizer", w.tmp], str(w.tmp))),
    ("tok-out-under-file", lambda w: (["tokenize", w.text(), "--out", w.file("taken", "x") / "d", "--tokenizer",
                                       w.spm], "taken")),
]

_TRAIN = ["pretrain", "--steps", 1, "--eval-batches", 1, "--batch-size", 2, "--device", "cpu", "--no-compile"]
PRETRAIN = [
    ("pre-data-missing", lambda w: ([*_TRAIN, "--data", w.tmp / "nod", "--out", w.out], "nod")),
    ("pre-data-not-folder", lambda w: ([*_TRAIN, "--data", w.text(), "--out", w.out], "corpus.txt")),
    ("pre-data-meta-list", lambda w: ([*_TRAIN, "--data", w.data_with(meta=[1]), "--out", w.out], "meta.json")),
    ("pre-data-truncated", lambda w: ([*_TRAIN, "--data", w.data_with(truncate="train.bin"), "--out", w.out],
                                      "train.bin")),
    ("pre-steps-0", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--steps", 0], "--steps")),
    ("pre-batch-0", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--batch-size", 0], "--batch-size")),
    ("pre-lr-neg", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--lr", -1], "--lr")),
    ("pre-lr-nan", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--lr", "nan"], "--lr")),
    ("pre-lr-inf", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--lr", "inf"], "--lr")),
    ("pre-seq-long", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--seq-len", 4096], "--seq-len")),
    ("pre-config-list", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--config",
                                    w.file("c.json", "[1]")], "c.json")),
    ("pre-config-no-heads", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--config",
                                        w.file("c.json", json.dumps({"vocab_size": 400}))], "num_heads")),
    ("pre-preset", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--preset", "huge"], "huge")),
    ("pre-fixed-no-file", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--g-mode", "fixed"],
                                     "--g-file")),
    ("pre-g-file-png", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--g-mode", "fixed", "--g-file",
                                   w.png("g.safetensors")], "g.safetensors")),
    ("pre-dag-text", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--dag", "a,b,c"], "--dag")),
    ("pre-dag-two", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--dag", "0.1,0.2"], "--dag")),
    ("pre-dag-nan", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--dag", "nan,0,0"], "--dag")),
    ("pre-device", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--device", "banana"], "banana")),
    ("pre-parallel", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--parallel", "banana"], "banana")),
    ("pre-out-is-file", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.file("taken", "x")], "taken")),
    ("pre-grad-accum-0", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--grad-accum", 0], "--grad-accum")),
    ("pre-eval-every-0", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--eval-every", 0], "--eval-every")),
    ("pre-warmup-neg", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--warmup", -1], "--warmup")),
    ("pre-g-file-shape", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--g-mode", "fixed", "--g-file",
                                     w.gcache_of_shape(3, 2, 16)], "other.safetensors")),
    ("pre-vocab-below-data", lambda w: ([*_TRAIN, "--data", w.data, "--out", w.out, "--config",
                                      w.file("c.json", json.dumps({**json.loads((w.model / "config.json")
                                                                                .read_text()), "vocab_size": 50}))],
                                     "vocab")),
]

_GC = lambda w, *extra: ["export-gcache", w.model, "--out", w.tmp / "g.safetensors", *extra]  # noqa: E731
EXPORT = [
    ("gc-model-missing", lambda w: (["export-gcache", w.tmp / "nope", "--out", w.out], "nope")),
    ("gc-model-truncated", lambda w: (["export-gcache", w.model_with_weights(truncate=64), "--out", w.out,
                                       "--tokens", "3"], "model.safetensors")),
    ("gc-tokens-text", lambda w: (_GC(w, "--tokens", "a,b"), "--tokens")),
    ("gc-tokens-range", lambda w: (_GC(w, "--tokens", "99999"), "99999")),
    ("gc-tokens-neg", lambda w: (_GC(w, "--tokens", "-1"), "-1")),
    ("gc-tokens-empty", lambda w: (_GC(w, "--tokens", ""), "--tokens")),
    ("gc-tokens-long", lambda w: (_GC(w, "--tokens", ",".join(["5"] * 500)), "500")),
    ("gc-reduce", lambda w: (_GC(w, "--reduce", "banana"), "banana")),
    ("gc-prompts-missing", lambda w: (_GC(w, "--prompts-file", w.tmp / "p.txt"), "p.txt")),
    ("gc-prompts-empty", lambda w: (_GC(w, "--prompts-file", w.file("p.txt")), "p.txt")),
    ("gc-prompts-png", lambda w: (_GC(w, "--prompts-file", w.png("p.txt")), "p.txt")),
    ("gc-tokenizer-missing", lambda w: (_GC(w, "--prompt", "hi", "--tokenizer", w.tmp / "t.model"), "t.model")),
    ("gc-no-tokenizer", lambda w: (["export-gcache", w.model_without("tokenizer.model"), "--out",
                                    w.tmp / "g.safetensors", "--prompt", "hi"], "tokenizer")),
    ("gc-device", lambda w: (_GC(w, "--tokens", "3", "--device", "banana"), "banana")),
    ("gc-out-is-dir", lambda w: (["export-gcache", w.model, "--out", w.tmp, "--tokens", "3"], str(w.tmp.name))),
    ("gc-tokens-vocab-edge", lambda w: (_GC(w, "--tokens", "5,400"), "400")),
    ("gc-out-under-file", lambda w: (["export-gcache", w.model, "--out", w.file("taken", "x") / "g.safetensors",
                                      "--tokens", "3"], "taken")),
]

_GEN = lambda w, *extra: ["generate", w.model, "--tokens", "5,6", "-n", 2, "--device", "cpu", *extra]  # noqa: E731
GENERATE = [
    ("gen-model-missing", lambda w: (["generate", w.tmp / "nope", "--tokens", "5"], "nope")),
    ("gen-model-png", lambda w: (["generate", w.model_with_weights(PNG), "--tokens", "5"], "model.safetensors")),
    ("gen-pth-pickle", lambda w: (["generate", w.pickle("c.pth"), "--tokens", "5"], "c.pth")),
    ("gen-gcache-missing", lambda w: (_GEN(w, "--gcache", w.tmp / "g.safetensors"), "g.safetensors")),
    ("gen-gcache-png", lambda w: (_GEN(w, "--gcache", w.png("g.safetensors")), "g.safetensors")),
    ("gen-gcache-shape", lambda w: (_GEN(w, "--gcache", w.gcache_of_shape(3, 2, 16)), "other.safetensors")),
    ("gen-gcache-foreign", lambda w: (_GEN(w, "--gcache", w.gcache_of_shape(2, 2, 16)), "--force")),
    ("gen-gcache-model-file", lambda w: (_GEN(w, "--gcache", w.model / "model.safetensors"),
                                         "model.safetensors")),
    ("gen-n-neg", lambda w: (_GEN(w, "-n", -1), "--max-new-tokens")),
    ("gen-temp-neg", lambda w: (_GEN(w, "-t", -1), "--temperature")),
    ("gen-temp-nan", lambda w: (_GEN(w, "-t", "nan"), "--temperature")),
    ("gen-temp-inf", lambda w: (_GEN(w, "-t", "inf"), "--temperature")),
    ("gen-top-k-neg", lambda w: (_GEN(w, "--top-k", -1), "--top-k")),
    ("gen-top-p-0", lambda w: (_GEN(w, "--top-p", 0), "--top-p")),
    ("gen-top-p-nan", lambda w: (_GEN(w, "--top-p", "nan"), "--top-p")),
    ("gen-top-p-big", lambda w: (_GEN(w, "--top-p", 1.5), "--top-p")),
    ("gen-dtype", lambda w: (_GEN(w, "--dtype", "int8"), "int8")),
    ("gen-device", lambda w: (["generate", w.model, "--tokens", "5", "--device", "banana"], "banana")),
    ("gen-tokens-text", lambda w: (["generate", w.model, "--tokens", "x", "--device", "cpu"], "--tokens")),
    ("gen-tokens-range", lambda w: (["generate", w.model, "--tokens", "99999", "--device", "cpu"], "99999")),
    ("gen-prompts-missing", lambda w: (_GEN(w, "--prompts-file", w.tmp / "p.txt"), "p.txt")),
    ("gen-no-tokenizer", lambda w: (["generate", w.model_without("tokenizer.model"), "--prompt", "hi",
                                     "--device", "cpu"], "tokenizer")),
    ("gen-tokens-empty", lambda w: (["generate", w.model, "--tokens", "", "--device", "cpu"], "--tokens")),
    ("gen-gcache-is-weights", lambda w: (_GEN(w, "--gcache", w.model / "model.safetensors"), "G-cache")),
    ("gen-top-k-big-ok-but-n-huge", lambda w: (_GEN(w, "-n", 10**9), "--max-new-tokens")),
]

TINY_TASK = Path(__file__).resolve().parent / "data" / "tiny_mc.yaml"
_EV = lambda w, *extra: ["eval", w.model, "--tasks", TINY_TASK, "--device", "cpu", *extra]  # noqa: E731
EVAL = [
    ("eval-model-missing", lambda w: (["eval", w.tmp / "nope", "--tasks", "pldr_zeroshot"], "nope")),
    ("eval-model-truncated", lambda w: (["eval", w.model_with_weights(truncate=64), "--tasks", TINY_TASK],
                                        "model.safetensors")),
    ("eval-task-yaml-missing", lambda w: (["eval", w.model, "--tasks", w.tmp / "t.yaml", "--device", "cpu"],
                                          "t.yaml")),
    ("eval-tasks-empty", lambda w: (["eval", w.model, "--tasks", "", "--device", "cpu"], "--tasks")),
    ("eval-batch-0", lambda w: (_EV(w, "--batch-size", 0), "batch size")),
    ("eval-limit-0", lambda w: (_EV(w, "--limit", 0), "--limit")),
    ("eval-limit-neg", lambda w: (_EV(w, "--limit", -1), "--limit")),
    ("eval-gcache-missing", lambda w: (_EV(w, "--gcache", w.tmp / "g.safetensors"), "g.safetensors")),
    ("eval-gcache-png", lambda w: (_EV(w, "--gcache", w.png("g.safetensors")), "g.safetensors")),
    ("eval-compare-shape", lambda w: (_EV(w, "--compare-gcache", w.gcache_of_shape(3, 2, 16)),
                                      "other.safetensors")),
    ("eval-data-dir-missing", lambda w: (_EV(w, "--data-dir", w.tmp / "olmo"), "olmo")),
    ("eval-device", lambda w: (["eval", w.model, "--tasks", "pldr_zeroshot", "--device", "banana"], "banana")),
    ("eval-batch-neg", lambda w: (_EV(w, "--batch-size", -1), "batch size")),
]

_IN = lambda w, *extra: ["inspect", w.model, "--prompt", "", *extra]  # noqa: E731
INSPECT = [
    ("insp-model-missing", lambda w: (["inspect", w.tmp / "nope"], "nope")),
    ("insp-model-truncated", lambda w: (["inspect", w.model_with_weights(truncate=64), "--prompt", ""],
                                        "model.safetensors")),
    ("insp-data-missing", lambda w: (["inspect", w.model, "--data", w.tmp / "nod"], "nod")),
    ("insp-data-meta-list", lambda w: (["inspect", w.model, "--data", w.data_with(meta=[1])], "meta.json")),
    ("insp-samples-0", lambda w: (["inspect", w.model, "--data", w.data, "--samples", 0], "--samples")),
    ("insp-samples-neg", lambda w: (["inspect", w.model, "--data", w.data, "--samples", -1], "--samples")),
    ("insp-max-len-0", lambda w: (_IN(w, "--max-len", 0), "--max-len")),
    ("insp-new-tokens-neg", lambda w: (_IN(w, "--new-tokens", -1), "--new-tokens")),
    ("insp-gcache-shape", lambda w: (_IN(w, "--gcache", w.gcache_of_shape(3, 2, 16)), "other.safetensors")),
    ("insp-gcache-png", lambda w: (_IN(w, "--gcache", w.png("g.safetensors")), "g.safetensors")),
    ("insp-prompts-missing", lambda w: (["inspect", w.model, "--prompts-file", w.tmp / "p.txt"], "p.txt")),
    ("insp-json-is-dir", lambda w: (_IN(w, "--json", (w.tmp / "d").mkdir() or w.tmp / "d"), str(w.tmp / "d"))),
    ("insp-device", lambda w: (_IN(w, "--device", "banana"), "banana")),
    ("insp-dump-under-file", lambda w: (_IN(w, "--dump", w.file("taken", "x") / "d.safetensors"), "taken")),
]

_BE = lambda *extra: ["bench", "train", "--preset", "tiny", "--device", "cpu", *extra]  # noqa: E731
BENCH = [
    ("bench-what", lambda w: (["bench", "nonsense", "--device", "cpu"], "nonsense")),
    ("bench-preset", lambda w: (["bench", "--preset", "huge", "--device", "cpu"], "huge")),
    ("bench-batch-0", lambda w: (_BE("--batch", 0), "--batch")),
    ("bench-steps-0", lambda w: (_BE("--steps", 0), "--steps")),
    ("bench-seq-0", lambda w: (_BE("--seq-len", 0), "--seq-len")),
    ("bench-repeats-0", lambda w: (["bench", "decode", "--device", "cpu", "--repeats", 0], "--repeats")),
    ("bench-device", lambda w: (["bench", "--device", "banana"], "banana")),
    ("bench-json-dir", lambda w: (["bench", "--device", "cpu", "--json", w.tmp], "--json")),
    ("bench-decode-batch-0", lambda w: (["bench", "decode", "--device", "cpu", "--decode-batch", 0],
                                        "--decode-batch")),
]

ONE_LINE = INIT + INFO + DOCTOR + TOKENIZE + PRETRAIN + EXPORT + GENERATE + EVAL + INSPECT + BENCH


def _param(case):
    return case if isinstance(case, type(pytest.param(None))) else pytest.param(*case, id=case[0])



def _snapshot(*roots: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, tiny_gcache, token_data, spm_model):
    return Workspace(tmp_path, tiny_model_dir, tiny_gcache, token_data, spm_model)


def _invoke(w: Workspace, build):
    args, needle = build(w)
    shared = (w.model, w.gcache.parent, w.data)
    before = _snapshot(w.tmp, *shared)
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert _snapshot(w.tmp, *shared) == before, "the command left something on disk"
    return r, needle


@pytest.mark.parametrize("name,build", [_param(c) for c in ONE_LINE])
def test_bad_input_is_one_line_naming_it(workspace, name, build):
    r, needle = _invoke(workspace, build)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("name,build", [_param(c) for c in DOCTOR_TABLE])
def test_doctor_reports_bad_input_in_its_table(workspace, name, build, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row a line, paths unbroken
    r, needle = _invoke(workspace, build)
    assert " error " in r.stdout and needle in " ".join(r.stdout.split()), r.stdout
