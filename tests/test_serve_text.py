"""A completion's text as its tokens arrive (``pldr_core.serve.text``): the plain-piece shortcut gives
exactly what SentencePiece's own decoding gives, token by token, stop strings and bytes included."""

from __future__ import annotations

import random

import pytest

from pldr_core.serve.text import TextStream, plain_pieces
from pldr_core.tokenizer import Tokenizer

TEXTS = ["It is a truth universally acknowledged, that a single man", "naïve café — 東京 🙂 x",
         "  double  spaces\tand tabs", "[SEP] user symbols [CLS]", "12345 digits, split"]


@pytest.fixture(scope="module")
def tok(spm_model):
    return Tokenizer(spm_model)


def streamed(tok, prompt, tokens, stop=(), plain=None):
    stream = TextStream(tok, prompt, stop, plain)
    out = [stream.push(t, i + 1 == len(tokens)) for i, t in enumerate(tokens)]
    return out, stream.text, stream.stopped


def test_plain_pieces_decode_to_themselves_after_text(tok):
    plain = plain_pieces(tok)
    sp = tok.sp
    special = [i for i in range(tok.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i)]
    assert len(plain) == tok.vocab_size - len(special) - sum(  # all but the special and lone markers
        1 for i in range(tok.vocab_size) if i not in special and sp.IdToPiece(i).strip("\u2581") == "")
    assert tok.eos_id not in plain and not any(tok.sp.IsByte(i) for i in plain)
    head = tok.encode("Call me", eos=False)
    for i in list(plain)[:300]:
        assert tok.decode(head + [i]) == tok.decode(head) + plain[i]


@pytest.mark.parametrize("seed", range(6))
def test_the_shortcut_streams_what_the_decoder_streams(tok, seed):
    rng = random.Random(seed)
    ids = [t for text in TEXTS for t in tok.encode(text)]  # real sequences, EOS between them
    for _ in range(40):
        prompt = rng.choice([[], [tok.eos_id], ids[:rng.randint(1, 9)]])
        if rng.random() < 0.5:
            start = rng.randrange(len(ids) - 30)
            tokens = ids[start:start + rng.randint(1, 30)]
        else:  # any id at all: bytes out of order, control ids, lone markers
            tokens = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        stop = tuple(rng.sample(["a", "the", ", t", "é", "\n", "tr"], rng.randint(0, 2)))
        want = streamed(tok, prompt or [tok.eos_id], tokens, stop)
        got = streamed(tok, prompt or [tok.eos_id], tokens, stop, plain_pieces(tok))
        assert got == want
        assert "".join(want[0]) == want[1]


def test_ids_past_the_tokenizer_decode_to_nothing(tok):
    # A model's vocabulary may be padded past its tokenizer's pieces; a sampled id there is no text
    # (it used to end a served request with SentencePiece's "piece id is out of range").
    past = tok.vocab_size + 7
    head = tok.encode("Call me", eos=False)
    assert tok.decode(head + [past]) == tok.decode(head) and tok.id_to_piece(past) == ""
    out, text, _ = streamed(tok, head, [past, head[0], past], plain=plain_pieces(tok))
    assert text == tok.decode(head + [head[0]])[len(tok.decode(head)):]


@pytest.mark.parametrize("seed", range(4))
def test_tokens_taken_in_runs_stream_what_they_stream_one_by_one(tok, seed):
    # A served chunk hands a row several tokens at once (``extend``): the text is that of pushing them
    # one at a time, however the tokens are split into runs.
    rng = random.Random(seed)
    ids = [t for text in TEXTS for t in tok.encode(text)]
    plain = plain_pieces(tok)
    for _ in range(40):
        prompt = rng.choice([[tok.eos_id], ids[:rng.randint(1, 9)]])
        if rng.random() < 0.5:
            start = rng.randrange(len(ids) - 30)
            tokens = ids[start:start + rng.randint(1, 30)]
        else:
            tokens = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        stop = tuple(rng.sample(["a", "the", ", t"], rng.randint(0, 1)))
        out, text, stopped = streamed(tok, prompt, tokens, stop, plain)
        if stopped:
            continue  # a stop string ends the completion where one token completes it: one by one
        stream = TextStream(tok, prompt, stop, plain)
        runs, i = [], 0
        while i < len(tokens):
            n = rng.randint(1, 9)
            runs.append(stream.extend(tokens[i:i + n], i + n >= len(tokens)))
            i += n
        assert "".join(runs) == "".join(out) == text == stream.text
