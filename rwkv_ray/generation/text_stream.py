"""`TextStream`: streamed token ids -> text pieces that concatenate to the final text."""

from __future__ import annotations

import codecs


def generated_bytes(tokenizer, ids) -> bytes:
    """Bytes of generated token ids. An id the tokenizer has no entry for decodes to
    nothing: a model may have more output rows than the tokenizer has tokens (World: 65536
    rows, ids up to 65529), and sampling can draw one (the official pipeline raises)."""
    try:
        return tokenizer.decode_bytes(ids)
    except ValueError:
        pass
    out = []
    for token in ids:
        try:
            out.append(tokenizer.decode_bytes([token]))
        except ValueError:
            continue
    return b"".join(out)


class TextStream:
    """Token ids -> text pieces whose concatenation is the final text: a cut multi-byte
    character is held back, and so are the last characters that could start a stop string."""

    def __init__(self, tokenizer, end_tokens, stop):
        self.tokenizer, self.end_tokens = tokenizer, frozenset(end_tokens)
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        # A stop string found later starts at most its length - 1 characters back.
        self.hold = max((len(s.encode()) - 1 for s in self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        if token in self.end_tokens or self.stopped:
            return ""
        self.text += self.decoder.decode(generated_bytes(self.tokenizer, [token]))
        tail = self.text[max(0, self.sent - self.hold) :]
        if any(s in tail for s in self.stops):  # generation ends here: `finish` cuts it
            self.stopped = True
            return ""
        safe = len(self.text) - self.hold
        piece = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent += len(piece)
        return piece

    def finish(self, final_text: str) -> str:
        return final_text[self.sent :]
