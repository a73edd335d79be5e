"""The engine step's only host<->device copies: one packed upload in, one packed download out.

`Staging.upload` puts a step's int32 inputs on the device (on CUDA through a
persistent pinned buffer and one non-blocking copy); `Staging.download` is the
one device->host copy of a step's results (pinned buffer, non-blocking copy,
one event sync). Everything else in the step stays on the device, so a step
synchronises with the device exactly once. The counters make that testable
on a CPU, where no copy is a real sync: tests read them around a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Bound before anything can patch them: tests wrap `torch.Tensor.numpy` & co. to catch stray syncs in a
# step, and the one sanctioned transfer must not count as one.
_numpy = torch.Tensor.numpy


@dataclass
class TransferCounts:
    host_to_device: int = 0
    device_to_host: int = 0


COUNTS = TransferCounts()


class Staging:
    """Per-engine staging buffers, grown on demand and reused every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._up_host = torch.empty(0, dtype=torch.int32, pin_memory=self._pinned)
        self._up_dev = torch.empty(0, dtype=torch.int32, device=device)
        self._down_host = torch.empty(0, dtype=torch.int32, pin_memory=self._pinned)
        self._up_done: torch.cuda.Event | None = None

    def upload(self, host: np.ndarray) -> torch.Tensor:
        """host: 1-D int32 -> the same values on the device (a view valid until the next upload)."""
        COUNTS.host_to_device += 1
        assert host.dtype == np.int32 and host.ndim == 1
        if not self._pinned:
            return torch.from_numpy(host).to(self.device)
        n = host.size
        if self._up_done is not None:  # the last step's copy must have left the pinned buffer before reuse
            self._up_done.synchronize()
        if self._up_host.numel() < n:
            self._up_host = torch.empty(_grow(n), dtype=torch.int32, pin_memory=True)
            self._up_dev = torch.empty(_grow(n), dtype=torch.int32, device=self.device)
        np.copyto(_numpy(self._up_host[:n]), host)
        self._up_dev[:n].copy_(self._up_host[:n], non_blocking=True)
        self._up_done = torch.cuda.Event()
        self._up_done.record()
        return self._up_dev[:n]

    def download(self, values: torch.Tensor) -> np.ndarray:
        """values: 1-D int32 on the device -> a host copy; the step's one synchronisation."""
        COUNTS.device_to_host += 1
        assert values.dtype == torch.int32 and values.dim() == 1
        if values.device.type == "cpu":
            return _numpy(values).copy()
        if not self._pinned:  # MPS: no pinned memory; a blocking copy is still one sync
            return _numpy(values.to("cpu"))
        n = values.numel()
        if self._down_host.numel() < n:
            self._down_host = torch.empty(_grow(n), dtype=torch.int32, pin_memory=True)
        self._down_host[:n].copy_(values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return _numpy(self._down_host[:n]).copy()


def _grow(n: int) -> int:
    """Room for n and some headroom, so a slowly growing batch does not reallocate every step."""
    return max(1024, 1 << (n - 1).bit_length())
