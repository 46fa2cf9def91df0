"""pldr tokenize and the token data folder."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from pldr_cli.app import app

WORDS = ("the whale ship sailed over a grey sea while the captain watched the horizon and the crew "
         "sang of home harbour storm and sail").split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + "." for _ in range(n)]


def _run(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def test_tokenize_text_folder(tmp_path):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    docs = _docs(60)
    for i, d in enumerate(docs):
        (src / ("sub" if i % 2 else "") / f"d{i}.txt").write_text(d + "\n")
    out = tmp_path / "tok"
    r = _run("tokenize", src, "--out", out, "--vocab-size", 400, "--seq-len", 32, "--val-fraction", 0.1)
    assert r.exit_code == 0, r.output
    from pldr_core.data import TokenData
    from pldr_core.tokenizer import Tokenizer

    data = TokenData(out)
    meta = data.meta
    assert meta["documents"] == 60 and meta["seq_len"] == 32 and meta["dtype"] == "uint16"
    assert data.train.shape == (meta["rows"]["train"], 32) and data.val.shape[0] == meta["rows"]["val"] > 0
    assert meta["rows"]["train"] + meta["rows"]["val"] == meta["tokens"] // 32
    tok = Tokenizer(data.tokenizer_path)
    assert tok.vocab_size == meta["tokenizer"]["vocab_size"] <= 400
    # One EOS per document, no BOS; every stored id is a valid piece.
    stream = np.concatenate([data.train.reshape(-1), data.val.reshape(-1)])
    assert (stream == tok.eos_id).sum() <= 60 and (stream == tok.bos_id).sum() == 0
    assert stream.max() < tok.vocab_size
    # The stored stream decodes back to the corpus text (train rows come first in corpus order).
    expected = sum(len(tok.encode(d)) for d in docs)
    assert meta["tokens"] == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tok")]


def test_tokenize_jsonl_with_column_and_given_tokenizer(tmp_path, spm_model):
    f = tmp_path / "c.jsonl"
    docs = _docs(40, seed=1)
    f.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "tok"
    r = _run("tokenize", f, "--out", out, "--text-column", "body", "--tokenizer", spm_model,
             "--seq-len", 16, "--val-fraction", 0.05)
    assert r.exit_code == 0, r.output
    from pldr_core.data import TokenData
    from pldr_core.tokenizer import Tokenizer

    data = TokenData(out)
    tok = Tokenizer(spm_model)
    assert data.meta["tokenizer"]["trained"] is False and data.vocab_size == tok.vocab_size
    flat = np.concatenate([tok.encode(d) for d in docs])
    rows = flat[: (flat.size // 16) * 16].reshape(-1, 16)
    stored = {r.tobytes() for r in np.concatenate([data.train, data.val]).astype(np.int64)}
    assert stored == {r.tobytes() for r in rows}
    # Missing column: one line, exit 2, nothing written.
    bad = tmp_path / "bad"
    r = _run("tokenize", f, "--out", bad, "--tokenizer", spm_model)
    assert r.exit_code == 2 and "--text-column" in r.output and not bad.exists()


def test_tokenize_save_to_disk_and_parquet(tmp_path, spm_model):
    import datasets

    docs = _docs(30, seed=2)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "p.parquet"))
    out = tmp_path / "tok"
    r = _run("tokenize", tmp_path / "saved", tmp_path / "p.parquet", "--out", out, "--tokenizer", spm_model,
             "--seq-len", 16)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "meta.json").read_text())["documents"] == 60
    # A meta.json without the tokenizer's vocabulary size is a clear error, not a KeyError.
    from pldr_core.data import TokenData
    from pldr_core.errors import PLDRError

    meta = json.loads((out / "meta.json").read_text())
    del meta["tokenizer"]["vocab_size"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PLDRError, match="unreadable or incomplete"):
        TokenData(out)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_file", "bad_suffix", "too_small",
                                  "hf_offline", "bad_seq"])
def test_tokenize_bad_inputs_exit_2_and_write_nothing(tmp_path, spm_model, case, monkeypatch):
    args = []
    if case == "missing":
        args = [tmp_path / "nope.txt"]
    elif case == "empty_dir":
        (tmp_path / "e").mkdir()
        (tmp_path / "e" / "x.bin").write_bytes(b"\0")
        args = [tmp_path / "e"]
    elif case == "empty_file":
        (tmp_path / "empty.txt").write_text("  \n\n")
        args = [tmp_path / "empty.txt"]
    elif case == "bad_suffix":
        (tmp_path / "x.docx").write_text("hello")
        args = [tmp_path / "x.docx"]
    elif case == "too_small":
        (tmp_path / "s.txt").write_text("the whale.")
        args = [tmp_path / "s.txt", "--seq-len", 512]
    elif case == "hf_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        args = ["hf:no-such-user/no-such-dataset"]
    elif case == "bad_seq":
        (tmp_path / "s.txt").write_text("the whale.")
        args = [tmp_path / "s.txt", "--seq-len", 1]
    out = tmp_path / "out"
    r = _run("tokenize", *args, "--out", out, "--tokenizer", spm_model)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.output.strip().splitlines()[-1] == errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_embedded_corpus_and_training_lines():
    from pldr_core.corpus import clean_brown, iter_embedded_documents

    docs = list(iter_embedded_documents())
    sources = {d["source"].split("/")[0] for d in docs}
    assert sources == {"moby_dick", "shakespeare", "sotu"}
    assert sum(len(d["text"]) for d in docs) > 5_000_000
    assert any("Call me Ishmael" in d["text"] for d in docs)
    assert clean_brown("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n") == 'The jury said " no ".'


def test_row_sampler_is_a_pure_function_of_position():
    from pldr_core.data import RowSampler

    split = np.arange(10 * 8, dtype=np.uint16).reshape(10, 8)
    s = RowSampler(split, 8, seed=3)
    assert s.num_samples == 9
    first_epoch = np.stack([s.sample(p) for p in range(9)])
    assert sorted(first_epoch[:, 0] // 8) == list(range(9))  # a permutation of the samples
    assert (first_epoch[:, 1:] == first_epoch[:, :-1] + 1).all()  # S+1 consecutive tokens
    again = RowSampler(split, 8, seed=3)
    assert np.array_equal(again.batch(13, 4), s.batch(13, 4))
    assert not np.array_equal(RowSampler(split, 8, seed=4).batch(0, 9), first_epoch)


def _latin1_corpus(tmp_path):
    """A Latin-1 text (as many public-domain e-texts are): valid UTF-8 up to line 31, then 0xe9."""
    docs = _docs(40, seed=3)
    docs[30] = "the café of the whale " + docs[30]
    path = tmp_path / "latin1.txt"
    path.write_bytes("\n".join(docs).encode("latin-1"))
    return path, docs


def test_tokenize_names_the_file_byte_and_line_of_invalid_utf8(tmp_path, spm_model):
    path, docs = _latin1_corpus(tmp_path)
    offset = len("\n".join(docs[:30]).encode()) + 1 + len("the caf")
    r = _run("tokenize", path, "--out", tmp_path / "out", "--tokenizer", spm_model)
    assert r.exit_code == 2, r.output
    (line,) = r.output.strip().splitlines()
    assert str(path) in line and "not valid utf-8" in line and "0xe9" in line
    assert f"offset {offset:,}" in line and "line 31" in line
    assert "--encoding latin-1" in line and "--errors replace" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]


def test_tokenize_decodes_with_the_given_encoding(tmp_path, spm_model):
    from pldr_core.data import TokenData
    from pldr_core.tokenizer import Tokenizer

    path, docs = _latin1_corpus(tmp_path)
    r = _run("tokenize", path, "--out", tmp_path / "out", "--tokenizer", spm_model, "--encoding", "latin-1",
             "--seq-len", 32, "--json")
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["encoding"] == {"name": "latin-1", "errors": "strict"}
    assert meta["characters"] == len("\n".join(docs))  # é read as one character, not replaced
    data = TokenData(tmp_path / "out")
    text = Tokenizer(data.tokenizer_path).decode(np.concatenate([data.train.reshape(-1), data.val.reshape(-1)]))
    assert "\ufffd" not in text


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_tokenize_errors_replace_reads_invalid_bytes(tmp_path, spm_model, suffix):
    docs = _docs(40, seed=4)
    if suffix == ".txt":
        raw = "\n".join(docs).encode() + b"\nbad \xff byte\n"
    else:
        raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs) + b'{"text": "bad \xff byte"}\n'
    path = tmp_path / f"c{suffix}"
    path.write_bytes(raw)
    assert _run("tokenize", path, "--out", tmp_path / "o1", "--tokenizer", spm_model).exit_code == 2
    r = _run("tokenize", path, "--out", tmp_path / "o2", "--tokenizer", spm_model, "--errors", "replace",
             "--seq-len", 32, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["documents"] == (1 if suffix == ".txt" else 41)


@pytest.mark.parametrize("args,needle", [(["--encoding", "klingon"], "--encoding 'klingon'"),
                                         (["--errors", "maybe"], "--errors 'maybe'")])
def test_tokenize_bad_encoding_options(tmp_path, spm_model, args, needle):
    (tmp_path / "a.txt").write_text("the whale. " * 200)
    r = _run("tokenize", tmp_path / "a.txt", "--out", tmp_path / "out", "--tokenizer", spm_model, *args)
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
