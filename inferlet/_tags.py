"""Finding open/close tags (`<think>`, `<tool_call>`) in streamed text, tags split across chunks included."""

from __future__ import annotations


class TagScanner:
    """Splits a text stream at `open_tag` / `close_tag`.

    `push(text)` returns (outside, inside, opened, closed) pieces for this
    chunk. Text that might be the start of a tag is held until the next chunk
    decides it.
    """

    def __init__(self, open_tag: str, close_tag: str, *, inside: bool = False) -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.inside = inside
        self._held = ""

    def push(self, text: str) -> list[tuple[str, str]]:
        """Events in order: ("text", s) outside, ("inner", s) inside, ("open", tag), ("close", tag)."""
        buf = self._held + text
        self._held = ""
        events: list[tuple[str, str]] = []
        while buf:
            tag = self.close_tag if self.inside else self.open_tag
            kind = "inner" if self.inside else "text"
            at = buf.find(tag)
            if at >= 0:
                if at:
                    events.append((kind, buf[:at]))
                events.append(("close" if self.inside else "open", tag))
                self.inside = not self.inside
                buf = buf[at + len(tag):]
                continue
            keep = _partial_suffix(buf, tag)
            if len(buf) > keep:
                events.append((kind, buf[:len(buf) - keep]))
            self._held = buf[len(buf) - keep:]
            break
        return events

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
