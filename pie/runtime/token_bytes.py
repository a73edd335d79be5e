"""The raw bytes behind each token of a Hugging Face `tokenizers` vocabulary.

Grammar engines (llguidance) and the inferlet API's `Tokenizer.vocabs()` need
a token's bytes, not its display string. Vocabularies store them in one of
two encodings, named by the tokenizer's decoder:

- byte-level BPE (GPT-2, Llama 3, Qwen): every byte is one printable unicode
  character (`bytes_to_unicode`), so `Ġthe` is b" the";
- SentencePiece style (Llama 2, Mistral, Gemma): `▁` stands for a space and
  byte-fallback tokens are written `<0xAB>`.

Added tokens (`<|im_end|>`, ...) are their literal UTF-8 text. Anything else
falls back to decoding the single token.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from tokenizers import Tokenizer

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode` (a fixed table, computed once)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _decoder_kinds(decoder: dict[str, Any] | None) -> set[str]:
    """Decoder type names, looking inside `Sequence` decoders."""
    if not decoder:
        return set()
    kinds = {str(decoder.get("type"))}
    for sub in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(sub)
    return kinds


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """bytes of every id in [0, vocab size), added tokens included; b"" for unused ids."""
    spec = json.loads(tokenizer.to_str())
    kinds = _decoder_kinds(spec.get("decoder"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    out = [b""] * size
    byte_level = "ByteLevel" in kinds
    table = _unicode_to_byte()
    added = {int(t["id"]) for t in spec.get("added_tokens") or []}
    for piece, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i in added:
            out[i] = piece.encode()
        elif byte_level and all(ch in table for ch in piece):
            out[i] = bytes(table[ch] for ch in piece)
        elif m := _BYTE_FALLBACK.match(piece):
            out[i] = bytes([int(m.group(1), 16)])
        elif "Metaspace" in kinds or "Replace" in kinds:
            out[i] = piece.replace("\u2581", " ").encode()
        else:
            out[i] = tokenizer.decode([i], skip_special_tokens=False).encode()
    return out
