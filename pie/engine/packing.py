"""Named sections of one flat int32 buffer: how a step's inputs travel in one copy and its results in one.

Host side, `Packer` concatenates int and float32 arrays into one int32 array
and remembers each section's (offset, length); float32 values travel as their
bit patterns. Device side, `Sections` splits the uploaded buffer back into
views by name: slicing is free, so the split launches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Packed:
    """A step's host inputs: `host` (int32) and each section's (offset, length) in it."""

    host: np.ndarray
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)

    def size(self, name: str) -> int:
        return self.sections[name][1] if name in self.sections else 0

    def with_section(self, name: str, values: np.ndarray) -> Packed:
        """A copy with `values` appended as section `name` (a step that uploads more on one device type)."""
        assert name not in self.sections, name
        a = _as_int32(values.reshape(-1))
        return Packed(np.concatenate([self.host, a]), {**self.sections, name: (self.host.size, a.size)})


class Packer:
    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._sections: dict[str, tuple[int, int]] = {}
        self._size = 0

    def add(self, name: str, values: np.ndarray) -> None:
        """Append `values` (any int dtype within int32, or float32) as section `name`."""
        assert name not in self._sections, name
        a = _as_int32(values.reshape(-1))
        self._sections[name] = (self._size, a.size)
        self._parts.append(a)
        self._size += a.size

    def add_floats(self, name: str, values: np.ndarray | list[float]) -> None:
        self.add(name, np.asarray(values, np.float32))

    def add_columns(self, names: tuple[str, ...], matrix: np.ndarray) -> None:
        """matrix [n, len(names)] (one dtype): each column becomes its own contiguous section, in one copy."""
        block = _as_int32(np.ascontiguousarray(matrix.T))  # [len(names), n]
        n = block.shape[1]
        for j, name in enumerate(names):
            assert name not in self._sections, name
            self._sections[name] = (self._size + j * n, n)
        self._parts.append(block.reshape(-1))
        self._size += block.size

    def finish(self) -> Packed:
        host = np.concatenate(self._parts) if self._parts else np.zeros(0, np.int32)
        return Packed(host, self._sections)


def _as_int32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.int32:
        return a
    return a.view(np.int32) if a.dtype == np.float32 else a.astype(np.int32)


class Sections:
    """The uploaded buffer on the device, read back by section name."""

    def __init__(self, packed: Packed, device_buffer: torch.Tensor) -> None:
        self._sections = packed.sections
        self._buffer = device_buffer
        self.names = packed.sections.keys()

    def ints(self, name: str) -> torch.Tensor:
        start, n = self._sections[name]
        return self._buffer[start:start + n]

    def longs(self, name: str) -> torch.Tensor:
        return self.ints(name).long()

    def floats(self, name: str) -> torch.Tensor:
        return self.ints(name).view(torch.float32)


class ResultPacker:
    """Device results gathered into one int32 tensor for the step's single download."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self.sections: dict[str, tuple[int, int]] = {}
        self._size = 0

    def add(self, name: str, values: torch.Tensor) -> None:
        """int tensors travel as int32 (token ids, indices), float tensors as float32 bit patterns."""
        flat = values.reshape(-1)
        flat = flat.float().view(torch.int32) if flat.is_floating_point() else flat.to(torch.int32)
        self.sections[name] = (self._size, flat.numel())  # shapes are host metadata: no sync
        self._parts.append(flat)
        self._size += flat.numel()

    def tensor(self, device: torch.device) -> torch.Tensor:
        if not self._parts:
            return torch.zeros(0, dtype=torch.int32, device=device)
        return torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0].contiguous()


class Results:
    """The downloaded results on the host, read back by section name."""

    def __init__(self, sections: dict[str, tuple[int, int]], host: np.ndarray) -> None:
        self._sections = sections
        self._host = host

    def ints(self, name: str) -> np.ndarray:
        start, n = self._sections.get(name, (0, 0))
        return self._host[start:start + n]

    def floats(self, name: str) -> np.ndarray:
        return self.ints(name).view(np.float32)
