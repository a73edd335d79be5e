"""WAV bytes -> a mono float waveform at the rate a model's feature extractor wants (stdlib `wave` + numpy).

PCM 8/16/24/32-bit integer and 32/64-bit IEEE float WAVs (the float format code `wave` refuses is read
from the RIFF chunks here); channels are averaged; another sampling rate is resampled linearly (band-
limited resampling is the sender's job: a 16 kHz clip is what Gemma 4 was trained on). Every problem is
an `InputError` saying what and the fix.
"""

from __future__ import annotations

import io
import struct
import wave

import numpy as np

from pie.errors import InputError

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def is_wav(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def _chunks(data: bytes) -> dict[bytes, bytes]:
    """The RIFF chunks of a WAV (the first of each id)."""
    out: dict[bytes, bytes] = {}
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        out.setdefault(cid, data[at + 8:at + 8 + size])
        at += 8 + size + (size & 1)
    return out


def _riff_wav(data: bytes) -> tuple[np.ndarray, int, int]:
    """(samples, channels, rate) of a WAV that `wave` refuses: IEEE float, or WAVE_FORMAT_EXTENSIBLE."""
    chunks = _chunks(data)
    fmt, body = chunks.get(b"fmt "), chunks.get(b"data")
    if fmt is None or body is None or len(fmt) < 16:
        raise InputError("the WAV has no fmt or data chunk")
    code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if code == _EXTENSIBLE and len(fmt) >= 26:
        code = struct.unpack("<H", fmt[24:26])[0]
    width = bits // 8
    usable = len(body) - len(body) % (max(width, 1) * max(channels, 1))
    if code == _PCM and width in (1, 2, 3, 4):
        return _pcm(body[:usable], width), channels, rate
    if code != _FLOAT or bits not in (32, 64):
        raise InputError(f"the WAV's sample format (code {code}, {bits} bits) is not PCM or 32/64-bit float")
    dtype = np.dtype("<f4" if bits == 32 else "<f8")
    return np.frombuffer(body[:usable], dtype=dtype).astype(np.float32), channels, rate


def _pcm(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # unsigned 8-bit
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return (np.frombuffer(raw, dtype=dtype) / float(1 << (8 * width - 1))).astype(np.float32)


def decode_wav(data: bytes, rate: int, max_seconds: float) -> np.ndarray:
    """A mono float32 waveform at `rate` Hz; InputError for bytes that are not a readable WAV or a clip
    longer than `max_seconds`."""
    if not data:
        raise InputError("the audio is empty (0 bytes)")
    if not is_wav(data):
        raise InputError(f"the audio is not a WAV file ({len(data)} bytes, no RIFF/WAVE header); send WAV bytes")
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, src_rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if src_rate > 0 and n / src_rate > max_seconds:
                raise InputError(f"the audio is {n / src_rate:.2f} s long, over the limit of {max_seconds:g} s; "
                                 "send a shorter clip")
            samples = _pcm(w.readframes(n), width)
    except wave.Error as e:
        if "unknown format: 3" not in str(e) and "unknown format: 65534" not in str(e):
            raise InputError(f"the audio cannot be decoded as WAV ({len(data)} bytes): {e}") from None
        samples, channels, src_rate = _riff_wav(data)
    except (EOFError, struct.error, KeyError, ValueError) as e:
        raise InputError(f"the audio cannot be decoded as WAV ({len(data)} bytes): {type(e).__name__}: {e}") from None
    if channels < 1 or src_rate < 1:
        raise InputError(f"the WAV says {channels} channels at {src_rate} Hz")
    samples = samples[:len(samples) - len(samples) % channels].reshape(-1, channels).mean(axis=1)
    if len(samples) / src_rate > max_seconds:
        raise InputError(f"the audio is {len(samples) / src_rate:.2f} s long, over the limit of {max_seconds:g} s; "
                         "send a shorter clip")
    if not len(samples):
        raise InputError("the WAV holds no samples")
    if src_rate != rate:
        n_out = max(1, round(len(samples) * rate / src_rate))
        samples = np.interp(np.arange(n_out) * (src_rate / rate), np.arange(len(samples)), samples)
    return np.ascontiguousarray(samples, dtype=np.float32)
