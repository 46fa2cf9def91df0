"""Text in, token data folder out, and the reader the trainer uses.

Token data folder::

    tokenizer.model   SentencePiece model (trained here unless one was given)
    train.bin         packed token ids, row-major [rows, seq_len], uint16 when V <= 65535 else uint32
    val.bin           the same for validation
    meta.json         tokenizer, source, counts, seq_len, dtype, rows

Documents are encoded without BOS, each followed by EOS, concatenated and cut into rows of seq_len
(the tail shorter than a row is dropped). Validation rows are every k-th row, so both splits sample
the whole corpus. Inputs are resolved and read in ``pldr_core.sources``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pldr_core.errors import PLDRError
from pldr_core.files import atomic_dir
from pldr_core.sources import check_codec, check_decodes, load_documents, resolve_inputs
from pldr_core.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer

META_FILE = "meta.json"

# A progress callback: progress(stage, done, total) with total None when unknown.
Progress = Callable[[str, int, "int | None"], None]


def _no_progress(stage: str, done: int, total: int | None) -> None:
    pass


def _training_lines(ds, limit: int) -> Iterator[str]:
    """Non-empty lines for SentencePiece (it skips lines longer than 4192 bytes, so split those)."""
    n = 0
    for batch in ds.iter(batch_size=256):
        for text in batch["text"]:
            for line in text.splitlines():
                line = line.strip()
                while line:
                    yield line[:4000]
                    line = line[4000:]
                    n += 1
                    if n >= limit:
                        return


# ---- encoding and packing -----------------------------------------------------------------------
def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split a long document at line breaks so a batch encode spreads it over threads."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + size)
        end = start + size if end <= start else end + 1
        out.append(text[start:end])
        start = end
    return out


def encode_to_stream(ds, tok, out_file: Path, dtype: np.dtype, *, progress: Progress = _no_progress,
                     num_threads: int | None = None, batch_docs: int = 64) -> tuple[int, int]:
    """Encode every document (no BOS, EOS after each) into a flat binary file; (docs, tokens)."""
    num_threads = num_threads or os.cpu_count() or 1
    total_docs = len(ds)
    n_tokens = 0
    done = 0
    with open(out_file, "wb") as fh:
        for batch in ds.iter(batch_size=batch_docs):
            pieces, owner = [], []
            for i, text in enumerate(batch["text"]):
                for chunk in _chunks(text):
                    pieces.append(chunk)
                    owner.append(i)
            ids = tok.sp.Encode(pieces, out_type=int, num_threads=num_threads)
            flat: list[int] = []
            for j, seq in enumerate(ids):
                flat.extend(seq)
                if j + 1 == len(ids) or owner[j + 1] != owner[j]:
                    flat.append(tok.eos_id)
            arr = np.asarray(flat, dtype=dtype)
            fh.write(arr.tobytes())
            n_tokens += arr.size
            done += len(batch["text"])
            progress("encode", done, total_docs)
    return total_docs, n_tokens


def split_rows(flat_file: Path, out_dir: Path, dtype: np.dtype, seq_len: int, val_fraction: float,
               ) -> dict:
    """Cut the flat stream into rows and write train.bin / val.bin (every k-th row to validation)."""
    n_tokens = flat_file.stat().st_size // dtype.itemsize
    rows = n_tokens // seq_len
    val_rows = 0 if val_fraction <= 0 else max(1, round(rows * val_fraction))
    if rows - val_rows < 1 or (val_fraction > 0 and rows < 2):
        raise PLDRError(f"corpus too small: {n_tokens:,} tokens make {rows} row(s) of seq_len {seq_len}; "
                        "give more text or a smaller --seq-len")
    flat = np.memmap(flat_file, dtype=dtype, mode="r", shape=(rows * seq_len,)).reshape(rows, seq_len)
    is_val = np.zeros(rows, dtype=bool)
    if val_rows:
        is_val[np.linspace(0, rows - 1, val_rows + 2, dtype=np.int64)[1:-1]] = True
        if is_val.sum() < val_rows:  # tiny corpora: linspace collided
            is_val[:] = False
            is_val[np.arange(rows - val_rows, rows)] = True
    for name, mask in (("train.bin", ~is_val), ("val.bin", is_val)):
        idx = np.flatnonzero(mask)
        with open(out_dir / name, "wb") as fh:
            for start in range(0, idx.size, 4096):
                fh.write(np.ascontiguousarray(flat[idx[start:start + 4096]]).tobytes())
    del flat
    return {"tokens": int(n_tokens), "tokens_dropped": int(n_tokens - rows * seq_len),
            "rows": {"train": int(rows - val_rows), "val": int(val_rows)}}


def tokenize_corpus(inputs: list[str], out: str | Path, *, vocab_size: int = 32000,
                    tokenizer: str | Path | None = None, seq_len: int = 1024, val_fraction: float = 0.01,
                    text_column: str = "text", encoding: str = "utf-8", encoding_errors: str = "strict",
                    progress: Progress = _no_progress, max_training_lines: int = 2_000_000) -> dict:
    """Read INPUTs, train (or load) the tokenizer, encode, pack and write the token data folder.

    The folder is written atomically; on any error nothing is left at ``out``. Returns meta.json.
    """

    if seq_len < 2:
        raise PLDRError(f"--seq-len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise PLDRError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if vocab_size < 16:
        raise PLDRError(f"--vocab-size must be at least 16, got {vocab_size}")
    if tokenizer is not None:
        Tokenizer(tokenizer)  # fails early on a bad model
    sources = resolve_inputs(list(inputs))
    check_codec(encoding, encoding_errors)
    if encoding_errors == "strict":
        for file in (f for src in sources if src.kind in ("text", "json") for f in src.files):
            check_decodes(file, encoding)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PLDRError(f"--out {out} exists and is not a folder")

    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        ds = load_documents(sources, text_column=text_column, cache_dir=work / "cache", encoding=encoding,
                            encoding_errors=encoding_errors)
        progress("read", len(ds), len(ds))
        if tokenizer is None:
            progress("train tokenizer", 0, None)
            model = train_tokenizer(_training_lines(ds, max_training_lines), work / "tok",
                                    vocab_size=vocab_size, num_threads=os.cpu_count() or 1)
            shutil.copyfile(model, tmp / TOKENIZER_FILE)
            progress("train tokenizer", 1, 1)
        else:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        tok = Tokenizer(tmp / TOKENIZER_FILE)
        dtype = dtype_for_vocab(tok.vocab_size)
        docs, _ = encode_to_stream(ds, tok, work / "all.bin", dtype, progress=progress)
        counts = split_rows(work / "all.bin", tmp, dtype, seq_len, val_fraction)
        chars = sum(len(t) for b in ds.iter(batch_size=1024) for t in b["text"])
        del ds
        shutil.rmtree(work)
        meta = {
            "format": "pldr-tokens",
            "version": 1,
            "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": tok.vocab_size,
                          "trained": tokenizer is None, "requested_vocab_size": vocab_size if tokenizer
                          is None else None, "source": None if tokenizer is None else str(tokenizer),
                          "eos_id": tok.eos_id, "pad_id": tok.pad_id},
            "source": [s.spec for s in sources],
            "text_column": text_column,
            "encoding": {"name": encoding, "errors": encoding_errors},
            "documents": docs,
            "characters": chars,
            "seq_len": seq_len,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            **counts,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---- reading a token data folder -----------------------------------------------------------------
class TokenData:
    """A token data folder: ``.train`` / ``.val`` memmaps [rows, seq_len], ``.meta``, ``.tokenizer_path``."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise PLDRError(f"{path} is not a token data folder (no {META_FILE}); make one with "
                            "`pldr tokenize`")
        try:
            self.meta = json.loads(meta_file.read_text())
            self.seq_len = int(self.meta["seq_len"])
            self.dtype = np.dtype(self.meta["dtype"])
            rows = self.meta["rows"]
            n_train, n_val = int(rows["train"]), int(rows["val"])
            self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PLDRError(f"{meta_file} is unreadable or incomplete ({exc})") from None
        self.tokenizer_path = path / TOKENIZER_FILE
        if not self.tokenizer_path.is_file():
            raise PLDRError(f"{path} has no {TOKENIZER_FILE}")
        self.train = self._open("train.bin", n_train)
        self.val = self._open("val.bin", n_val)

    def _open(self, name: str, rows: int) -> np.ndarray:
        file = self.path / name
        expected = rows * self.seq_len * self.dtype.itemsize
        if not file.is_file():
            raise PLDRError(f"{self.path} has no {name}")
        if file.stat().st_size != expected:
            raise PLDRError(f"{file} has {file.stat().st_size} bytes, meta.json promises {expected}")
        if rows == 0:
            return np.zeros((0, self.seq_len), dtype=self.dtype)
        return np.memmap(file, dtype=self.dtype, mode="r", shape=(rows, self.seq_len))

    def __repr__(self) -> str:
        return (f"TokenData({str(self.path)!r}, train={self.train.shape[0]} rows, "
                f"val={self.val.shape[0]} rows, seq_len={self.seq_len}, V={self.vocab_size})")


class RowSampler:
    """Training samples of ``seq_len + 1`` tokens cut from a split's flat token stream.

    Sample ``i`` is tokens ``[i*S, i*S + S + 1)``; their order in epoch ``e`` is a permutation seeded by
    ``(seed, e)``, so the sample of any global position is a pure function of that position (exact
    resume, and every rank can find its share of a global batch).
    """

    def __init__(self, split: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.flat = split.reshape(-1)
        self.seq_len = seq_len
        self.num_samples = max(0, (self.flat.size - 1) // seq_len)
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def sample(self, position: int) -> np.ndarray:
        epoch, k = divmod(position, self.num_samples)
        i = int(self._order(epoch)[k])
        return np.asarray(self.flat[i * self.seq_len: i * self.seq_len + self.seq_len + 1], dtype=np.int64)

    def batch(self, start: int, count: int) -> np.ndarray:
        """Samples at global positions ``start .. start+count-1`` as [count, S+1] int64."""
        return np.stack([self.sample(p) for p in range(start, start + count)])
