"""A checkpoint tensor before it is read: its shape now, the whole or any slice of it on demand.

The loader hands each checkpoint tensor to the layer that takes it as a
`TensorSource`. Replicated parameters read it whole (`full`, safetensors'
`get_tensor`: the single-device path reads exactly as it always did); a
tensor-parallel layer checks the full shape and then `read`s only its rank's
block (safetensors' `get_slice`), so a rank's load I/O for the sharded
weights is 1/tp of the checkpoint's.

    source.shape                      # the checkpoint tensor's full shape, nothing read yet
    source.read(slice(a, b))          # rows a..b-1
    source.read(slice(None), slice(a, b))   # columns a..b-1 (row-parallel layers)

`ReadCounter` adds up the bytes every source of one load returned, so a load
can report (and a test can check) how much of the checkpoint a rank read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pie.errors import CheckpointError

if TYPE_CHECKING:
    from safetensors import safe_open


@dataclass
class ReadCounter:
    """Bytes of tensor data read from the checkpoint during one load (whole tensors and slices)."""

    bytes_read: int = 0

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


class TensorSource(ABC):
    """One checkpoint tensor, named `name` in error messages."""

    name: str

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @abstractmethod
    def full(self) -> torch.Tensor:
        """The whole tensor."""

    @abstractmethod
    def read(self, *index: slice) -> torch.Tensor:
        """tensor[index] (one slice per leading dimension), reading only those elements."""

    def check_shape(self, expected: tuple[int, ...]) -> None:
        """A CheckpointError naming the tensor when its full shape is not `expected` (checked before reading)."""
        if self.shape != tuple(expected):
            raise CheckpointError(f"tensor {self.name!r} has shape {self.shape}, expected {tuple(expected)} "
                                  f"for this architecture")


class FileTensor(TensorSource):
    """Tensor `key` of an open safetensors file, called `name` in errors; reads count into `counter`."""

    def __init__(self, handle: safe_open, key: str, counter: ReadCounter, name: str | None = None) -> None:
        self.handle, self.key, self.counter, self.name = handle, key, counter, name or key
        self._slice: Any = None  # safetensors' PySafeSlice, opened on first use (the TP=1 path never needs it)

    def _lazy(self) -> Any:
        if self._slice is None:
            self._slice = self.handle.get_slice(self.key)
        return self._slice

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._lazy().get_shape())

    def full(self) -> torch.Tensor:
        return self.counter.add(self.handle.get_tensor(self.key))

    def read(self, *index: slice) -> torch.Tensor:
        return self.counter.add(self._lazy()[index])


class MemoryTensor(TensorSource):
    """A tensor already in memory (converted on load, e.g. dequantized, or built by a test)."""

    def __init__(self, tensor: torch.Tensor, name: str = "<in memory>") -> None:
        self.tensor, self.name = tensor, name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def full(self) -> torch.Tensor:
        return self.tensor

    def read(self, *index: slice) -> torch.Tensor:
        return self.tensor[index]


class LoadsSlices(ABC):
    """A module whose parameters are (partly) this rank's slice: it reads the source itself.

    The loader hands such a module the unread source; every other parameter gets the whole tensor.
    `shard` is the fused Linear's source index (q/k/v, gate/up), None for other modules.
    """

    @abstractmethod
    def load_slice(self, param_name: str, source: TensorSource, shard: int | None) -> None: ...
