"""SentencePiece tokenizer with the paper's ids and encoding.

Ids: pad 0 "[PAD]", unk 1 "[UNK]", bos 2 "[START]", eos 3 "[END]"; user symbols "[SEP]", "[CLS]".
Documents are encoded without BOS and followed by EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from pldr_core.errors import PLDRError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"
"""A model directory's (and a token data folder's) SentencePiece model."""


class Tokenizer:
    """A loaded SentencePiece model. ``encode`` appends EOS; ``decode`` drops special ids."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise PLDRError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise PLDRError(f"{path} is not a SentencePiece model ({exc})") from None
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, *, eos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ids + [self.eos_id] if eos else ids

    def encode_batch(self, texts: list[str], *, eos: bool = True) -> list[list[int]]:
        out = self.sp.Encode(texts, out_type=int)
        return [ids + [self.eos_id] for ids in out] if eos else out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special ids, and ids past the tokenizer's pieces (a model's vocabulary
        may be padded beyond its tokenizer's), decode to nothing."""
        special = {self.pad_id, self.bos_id, self.eos_id}
        n = self.vocab_size
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in special and 0 <= int(i) < n])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i)) if 0 <= int(i) < self.vocab_size else ""


def train_tokenizer(sentences: Iterable[str] | Iterator[str], out_prefix: str | Path, *,
                    vocab_size: int = 32000, num_threads: int = 2, input_sentence_size: int = 2_000_000,
                    hard_vocab_limit: bool = False) -> Path:
    """Train a unigram SentencePiece model with the paper's settings; returns ``<out_prefix>.model``.

    ``hard_vocab_limit`` False lets a small corpus yield a smaller vocabulary instead of failing.
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences),
            model_prefix=str(out_prefix),
            model_type="unigram",
            vocab_size=vocab_size,
            normalization_rule_name="nmt_nfkc",
            split_digits=True,
            byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[START]", eos_piece="[END]",
            user_defined_symbols=["[SEP]", "[CLS]"],
            num_threads=num_threads,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            hard_vocab_limit=hard_vocab_limit,
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise PLDRError(f"SentencePiece training failed: {exc}") from None
    return out_prefix.with_suffix(".model")
