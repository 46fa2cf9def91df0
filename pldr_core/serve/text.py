"""A completion's text as its tokens arrive: decoded a few tokens at a time, with stop strings cut off.

SentencePiece decodes a sequence, not a token: a token's text depends on its neighbours (the leading
space of a sequence is dropped; byte pieces join into UTF-8 characters). So each new token is decoded
in a short window with the tokens before it, and only the text the window gained is sent. Most tokens
are plain pieces whose text is the piece itself with its word marker as a space; those skip the
decoder (``plain_pieces``), which is most of a busy server's per-token work otherwise.
"""

from __future__ import annotations

WORD = "\u2581"  # SentencePiece's word-boundary marker


def plain_pieces(tokenizer) -> dict[int, str]:
    """id -> text for the pieces that decode to themselves after any non-empty text: not control,
    unknown, unused or byte pieces, with at least one character besides a single leading marker."""
    sp = tokenizer.sp
    out = {}
    for i in range(sp.GetPieceSize()):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i) or sp.IsByte(i):
            continue
        piece = sp.IdToPiece(i)
        body = piece[1:] if piece.startswith(WORD) else piece
        if body and WORD not in body:
            out[i] = piece.replace(WORD, " ")
    return out


class TextStream:
    """The continuation's text; ``push`` a token, get the text now safe to send. Text that may still
    turn into a stop string or a UTF-8 character is held back until it settles."""

    CONTEXT = 4  # prompt tokens decoded with the first new ones, so SentencePiece keeps their space

    def __init__(self, tokenizer, prompt: list[int], stop: tuple[str, ...], plain: dict[int, str] | None = None):
        self.tok, self.stop, self.plain = tokenizer, stop, plain or {}
        self.ids = list(prompt[-self.CONTEXT:])
        self.prefix, self.read = 0, len(self.ids)
        self.text, self.sent, self.stopped = "", 0, False
        self._window_text = bool(self.tok.decode(self.ids))

    def push(self, token: int, final: bool) -> str:
        """Add ``token``; return the text now safe to send (all that is left when ``final``)."""
        self._add(token, final)
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped, final = self.text[:min(cuts)], True, True
        safe = len(self.text) if final else len(self.text) - self._held()
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def extend(self, tokens: list[int], final: bool) -> str:
        """``push`` each of ``tokens`` (``final`` for the last); the text they make safe to send. Without
        stop strings nothing is held back, so the stop checks run once for the run, not per token."""
        if self.stop:
            return "".join(self.push(t, final and i == len(tokens) - 1) for i, t in enumerate(tokens))
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            self._add(token, final and i == last)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def _add(self, token: int, final: bool) -> None:
        """Append ``token``'s text to ``self.text`` (a UTF-8 character split over tokens waits until
        complete, unless ``final``)."""
        self.ids.append(token)
        piece = self.plain.get(token)
        if piece is not None and self._window_text and self.read == len(self.ids) - 1:
            # After a window that decodes to some text, a plain piece adds exactly itself.
            self.text += piece
            self.prefix, self.read = self.read, len(self.ids)
        else:
            head = self.tok.decode(self.ids[self.prefix:self.read])
            full = self.tok.decode(self.ids[self.prefix:])
            if len(full) > len(head) and (final or not full.endswith("\ufffd")):
                self.text += full[len(head):]
                self.prefix, self.read = self.read, len(self.ids)
                self._window_text = bool(self.tok.decode(self.ids[self.prefix:self.read]))

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
