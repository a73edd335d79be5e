"""Per-sequence recurrent-state slots for the linear-attention layers of hybrid models.

The second pool beside the KV pages. A slot holds, for every recurrent layer
(Gated DeltaNet; Mamba-2 has the same two parts), the causal-conv window (the
last `kernel - 1` conv inputs) and the recurrent state `[heads, dim_a, dim_b]`
(delta rule: key_dim x value_dim; Mamba-2: head_dim x state_size):

    conv:  [slots, layers, conv_dim, kernel - 1]   activation dtype
    state: [slots, layers, heads, dim_a, dim_b]    float32 (the recurrence accumulates in float32)

Slot-major, so one slot is one contiguous block per tensor: a fork, a
checkpoint or a swap is one indexed copy. Which slot a sequence uses is the
runtime's decision, as pages are; the pool never allocates. A slot's content
is "the state after the sequence's tokens so far"; a request that starts at
kv position 0 ignores (and overwrites) whatever its slot held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie.errors import BatchError, ConfigError


@dataclass(frozen=True)
class StateShape:
    num_layers: int  # recurrent (linear-attention) layers only
    conv_dim: int  # channels of the causal conv (Gated DeltaNet: 2 * key heads * key_dim + value heads * value_dim)
    conv_kernel: int  # linear_conv_kernel_dim; the window keeps kernel - 1 inputs
    num_heads: int
    dim_a: int
    dim_b: int
    conv_dtype: torch.dtype
    state_dtype: torch.dtype = torch.float32

    @property
    def conv_window(self) -> int:
        return self.conv_kernel - 1

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one sequence's state takes across all recurrent layers (independent of its length)."""
        conv = self.conv_dim * self.conv_window * _itemsize(self.conv_dtype)
        state = self.num_heads * self.dim_a * self.dim_b * _itemsize(self.state_dtype)
        return self.num_layers * (conv + state)

    def slots_for_budget(self, budget_bytes: int) -> int:
        """How many slots fit in `budget_bytes`; a ConfigError when not even one does."""
        n = budget_bytes // self.bytes_per_slot
        if n < 1:
            raise ConfigError(f"the recurrent-state budget of {budget_bytes} bytes holds no slot: one sequence's "
                              f"state takes {self.bytes_per_slot} bytes ({self.num_layers} layers); raise the "
                              f"state memory budget to at least {self.bytes_per_slot} bytes")
        return int(n)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class StatePool:
    def __init__(self, shape: StateShape, num_slots: int, device: torch.device) -> None:
        self.shape, self.num_slots, self.device = shape, num_slots, device
        s = shape
        self.conv = torch.zeros((num_slots, s.num_layers, s.conv_dim, s.conv_window), dtype=s.conv_dtype,
                                device=device)
        self.state = torch.zeros((num_slots, s.num_layers, s.num_heads, s.dim_a, s.dim_b), dtype=s.state_dtype,
                                 device=device)

    @classmethod
    def from_budget(cls, shape: StateShape, budget_bytes: int, device: torch.device,
                    max_slots: int | None = None) -> StatePool:
        n = shape.slots_for_budget(budget_bytes)
        return cls(shape, min(n, max_slots) if max_slots else n, device)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.state.numel() * self.state.element_size()

    def check_slots(self, slots: list[int], what: str = "state") -> torch.Tensor:
        """Slot ids as a device index tensor; a BatchError naming the first bad one."""
        for s in slots:
            if not 0 <= s < self.num_slots:
                raise BatchError(f"{what} slot {s} is out of range: the pool has slots 0..{self.num_slots - 1}")
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    # -- per layer, for the model's forward --

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv window [n, conv_dim, kernel - 1], state [n, heads, dim_a, dim_b]) of `slots` (copies)."""
        return self.conv[slots, layer], self.state[slots, layer]

    def write(self, layer: int, slots: torch.Tensor, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.conv[slots, layer] = conv.to(self.conv.dtype)
        self.state[slots, layer] = state.to(self.state.dtype)

    # -- whole slots, for the batch's slot operations --

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Slot src[i] -> dst[i] for every layer (fork; checkpoint a prefix's state). Sources read first."""
        if len(src) != len(dst):
            raise BatchError(f"state copy names {len(src)} sources and {len(dst)} destinations")
        if not src:
            return
        s, d = self.check_slots(src, "state copy source"), self.check_slots(dst, "state copy destination")
        self.conv[d] = self.conv[s]
        self.state[d] = self.state[s]

    def reset(self, slots: list[int]) -> None:
        """Zero `slots` (the state of an empty sequence)."""
        if slots:
            idx = self.check_slots(slots, "state reset")
            self.conv[idx] = 0
            self.state[idx] = 0

    def check_integrity(self) -> None:
        """Cheap invariants: shapes, dtypes and device as built, every value finite."""
        s = self.shape
        assert self.conv.shape == (self.num_slots, s.num_layers, s.conv_dim, s.conv_window), self.conv.shape
        assert self.state.shape == (self.num_slots, s.num_layers, s.num_heads, s.dim_a, s.dim_b), self.state.shape
        assert self.conv.dtype == s.conv_dtype and self.state.dtype == s.state_dtype, (self.conv.dtype,
                                                                                        self.state.dtype)
        assert self.conv.device.type == self.device.type == self.state.device.type, (self.conv.device, self.device)
        bad = [name for name, t in (("conv", self.conv), ("state", self.state)) if not bool(torch.isfinite(t).all())]
        assert not bad, f"non-finite values in the state pool's {bad} tensor(s)"


class StateSwapPool:
    """Host slots (pinned on CUDA) that suspended sequences' states are copied to; the device pool's layout."""

    def __init__(self, shape: StateShape, num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        pin = device.type == "cuda"
        s = shape
        self.conv = torch.zeros((num_slots, s.num_layers, s.conv_dim, s.conv_window), dtype=s.conv_dtype,
                                pin_memory=pin)
        self.state = torch.zeros((num_slots, s.num_layers, s.num_heads, s.dim_a, s.dim_b), dtype=s.state_dtype,
                                 pin_memory=pin)

    def _host_slots(self, slots: list[int]) -> torch.Tensor:
        for s in slots:
            if not 0 <= s < self.num_slots:
                raise BatchError(f"host state slot {s} is out of range: the swap pool has slots "
                                 f"0..{self.num_slots - 1}")
        return torch.tensor(slots, dtype=torch.long)

    def swap_out(self, pool: StatePool, pairs: list[tuple[int, int]]) -> None:
        """(device_slot, host_slot): device -> host."""
        if not pairs:
            return
        dev, host = zip(*pairs, strict=True)
        d, h = pool.check_slots(list(dev), "swap-out"), self._host_slots(list(host))
        self.conv[h] = pool.conv[d].cpu()
        self.state[h] = pool.state[d].cpu()

    def swap_in(self, pool: StatePool, pairs: list[tuple[int, int]]) -> None:
        """(host_slot, device_slot): host -> device."""
        if not pairs:
            return
        host, dev = zip(*pairs, strict=True)
        h, d = self._host_slots(list(host)), pool.check_slots(list(dev), "swap-in")
        pool.conv[d] = self.conv[h].to(pool.device, non_blocking=True)
        pool.state[d] = self.state[h].to(pool.device, non_blocking=True)


RECURRENT_EXTRAS = "recurrent"  # ForwardContext.extras key of a batch's RecurrentBatch


@dataclass(frozen=True)
class RecurrentGroup:
    """Requests a recurrent layer runs together: every 1-token request at once, or one longer request."""

    rows: torch.Tensor  # [n * q_len] batch rows, request-major
    slots: torch.Tensor  # [n] state slots
    q_len: int
    decode: bool  # the token-by-token form (1-token requests) rather than the chunked one


class RecurrentBatch:
    """How one forward batch addresses the state pool; built once per batch, read by every recurrent layer.

    Request r owns batch rows qo_indptr[r]:qo_indptr[r + 1] and state slot slots[r]; fresh[r] says it
    starts a sequence (kv position 0), so its slot is zeroed first instead of read.
    """

    def __init__(self, pool: StatePool, qo_indptr: list[int], slots: list[int], fresh: list[bool]) -> None:
        if len(set(slots)) != len(slots):
            raise BatchError(f"two requests of one batch name the same state slot ({slots}); each sequence "
                             f"needs its own slot (copy the slot to fork)")
        pool.check_slots(slots)
        self.pool = pool
        pool.reset([s for s, f in zip(slots, fresh, strict=True) if f])
        dev = pool.device
        q_lens = [qo_indptr[r + 1] - qo_indptr[r] for r in range(len(slots))]
        decode = [r for r, n in enumerate(q_lens) if n == 1]
        self.groups: list[RecurrentGroup] = []
        if decode:
            self.groups.append(RecurrentGroup(torch.tensor([qo_indptr[r] for r in decode], device=dev),
                                              torch.tensor([slots[r] for r in decode], device=dev), 1, True))
        for r, n in enumerate(q_lens):
            if n > 1:
                self.groups.append(RecurrentGroup(torch.arange(qo_indptr[r], qo_indptr[r + 1], device=dev),
                                                  torch.tensor([slots[r]], device=dev), n, False))
