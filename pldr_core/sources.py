"""INPUTs of ``pldr tokenize``: what each spec is, a cheap up-front check that text decodes (so a bad
byte is reported before any heavy work), and the documents read through the ``datasets`` library."""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from pathlib import Path

from pldr_core.corpus import iter_embedded_documents
from pldr_core.errors import PLDRError

TEXT_SUFFIXES = (".txt", ".text", ".md")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EMBEDDED = "embedded"


@dataclass
class Source:
    """One resolved INPUT: what it is and how ``datasets`` reads it."""

    spec: str
    kind: str  # text | json | parquet | disk | hf | embedded
    files: list[str]


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Check every INPUT before any heavy work; PLDRError names the first bad one."""
    if not inputs:
        return [Source(EMBEDDED, "embedded", [])]
    out = []
    for spec in inputs:
        spec = str(spec)
        if spec == EMBEDDED:
            out.append(Source(spec, "embedded", []))
            continue
        if spec.startswith("hf:"):
            if len(spec) <= 3:
                raise PLDRError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
            out.append(Source(spec, "hf", []))
            continue
        p = Path(spec)
        if not p.exists():
            raise PLDRError(f"input not found: {spec}")
        if p.is_dir():
            if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() \
                    or (p / "state.json").is_file():
                out.append(Source(spec, "disk", [str(p)]))
                continue
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            tables = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES)
            if files:
                out.append(Source(spec, "text", files))
            for f in tables:
                out.append(Source(f, TABLE_SUFFIXES[Path(f).suffix.lower()], [f]))
            if not files and not tables:
                raise PLDRError(f"{spec} holds no .txt/.jsonl/.json/.parquet files (nothing to tokenize)")
            continue
        suffix = p.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            out.append(Source(spec, "text", [str(p)]))
        elif suffix in TABLE_SUFFIXES:
            out.append(Source(spec, TABLE_SUFFIXES[suffix], [str(p)]))
        else:
            raise PLDRError(f"{spec}: unsupported input type {suffix or '(no suffix)'}; use .txt, .jsonl, "
                            ".json, .parquet, a folder, a datasets save_to_disk folder or hf:NAME")
        if not os.access(p, os.R_OK):
            raise PLDRError(f"{spec} is not readable")
    return out


def _text_only(ds, column: str, spec: str):
    names = ds.column_names
    if column not in names:
        raise PLDRError(f"{spec} has no column {column!r} (columns: {', '.join(names)}); "
                        "pick one with --text-column")
    return ds.select_columns([column]).rename_column(column, "text") if column != "text" \
        else ds.select_columns(["text"])


def load_documents(sources: list[Source], *, text_column: str = "text", cache_dir: str | Path,
                   encoding: str = "utf-8", encoding_errors: str = "strict"):
    """All documents as one ``datasets.Dataset`` with a single ``text`` column; text and JSON files are
    decoded with ``encoding`` and ``encoding_errors``."""
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    # datasets logs a failed read with its traceback before raising; the raise becomes our one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        parts = [_load_source(datasets, src, text_column, cache_dir, encoding, encoding_errors)
                 for src in sources]
    finally:
        datasets.logging.set_verbosity(verbosity)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = ds.filter(lambda t: t is not None and bool(t.strip()), input_columns="text")
    if len(ds) == 0:
        raise PLDRError(f"no text found in {', '.join(s.spec for s in sources)} (empty corpus)")
    return ds


def _load_source(datasets, src: Source, text_column: str, cache_dir, encoding: str, encoding_errors: str):
    """One INPUT as a ``datasets.Dataset`` with a ``text`` column."""
    # datasets passes UTF-8 JSON bytes to pyarrow undecoded (errors unhandled) unless the codec is
    # spelt otherwise; the alias routes them through decode(errors=...).
    json_encoding = "utf_8" if codecs.lookup(encoding).name == "utf-8" and encoding_errors != "strict" \
        else encoding
    try:
        if src.kind == "embedded":
            ds = datasets.Dataset.from_list(
                [{"text": d["text"]} for d in iter_embedded_documents()])
        elif src.kind == "text":
            ds = datasets.load_dataset("text", data_files=src.files, split="train",
                                       sample_by="document", cache_dir=str(cache_dir),
                                       encoding=encoding, encoding_errors=encoding_errors)
        elif src.kind == "json":
            ds = datasets.load_dataset("json", data_files=src.files, split="train", cache_dir=str(cache_dir),
                                       encoding=json_encoding, encoding_errors=encoding_errors)
            ds = _text_only(ds, text_column, src.spec)
        elif src.kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files=src.files, split="train",
                                       cache_dir=str(cache_dir))
            ds = _text_only(ds, text_column, src.spec)
        elif src.kind == "disk":
            ds = datasets.load_from_disk(src.files[0])
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
            ds = _text_only(ds, text_column, src.spec)
        else:  # hf:NAME[:CONFIG], streamed
            name, _, config = src.spec[3:].partition(":")
            if datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1" \
                    or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise PLDRError(f"cannot stream {src.spec}: the hub is switched off (HF_HUB_OFFLINE); "
                                "pass local files or a save_to_disk folder")
            stream = datasets.load_dataset(name, config or None, split="train", streaming=True)

            def gen(stream=stream):
                for row in stream:
                    if text_column not in row:
                        raise PLDRError(f"{src.spec} has no column {text_column!r} "
                                        f"(columns: {', '.join(row)}); pick one with --text-column")
                    yield {"text": row[text_column]}

            ds = datasets.Dataset.from_generator(gen, cache_dir=str(cache_dir))
    except PLDRError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable / unreachable inputs
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if src.kind == "hf":
            raise PLDRError(f"cannot stream {src.spec} from the hub ({msg}); offline, pass local "
                            "files or a save_to_disk folder") from None
        raise PLDRError(f"cannot read {src.spec}: {msg}") from None
    if ds.features["text"].dtype != "string":
        raise PLDRError(f"{src.spec}: column {text_column!r} does not hold text")
    return ds


# ---- checking that text decodes -------------------------------------------------------------------
ENCODING_ERRORS = ("strict", "replace", "ignore")


def check_codec(encoding: str, errors: str) -> None:
    """PLDRError naming the option when ``encoding`` is no known codec or ``errors`` no policy."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise PLDRError(f"--encoding {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, "
                        "cp1252)") from None
    if errors not in ENCODING_ERRORS:
        raise PLDRError(f"--errors {errors!r}: choose one of {', '.join(ENCODING_ERRORS)}")


def check_decodes(file: str | Path, encoding: str = "utf-8", chunk: int = 1 << 20) -> None:
    """Decode ``file`` in chunks; PLDRError with the byte offset and line of the first bad byte."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    with open(file, "rb") as fh:
        while True:
            data = fh.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                # the decoder sees the bytes it held back from the last chunk followed by this one
                bad = offset - (len(exc.object) - len(data)) + exc.start
                byte = exc.object[exc.start:exc.start + 1].hex()
                raise PLDRError(f"{file} is not valid {encoding} text: byte 0x{byte} at offset {bad:,} "
                                f"(line {_line_of(file, bad):,}); pass its encoding, e.g. --encoding latin-1, "
                                "or --errors replace") from None
            if not data:
                return
            offset += len(data)


def _line_of(file: str | Path, offset: int) -> int:
    with open(file, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1
