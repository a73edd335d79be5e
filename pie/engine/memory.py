"""How many KV pages fit: measured free memory on CUDA, a configured budget elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pie.engine.kv_cache import KVShape
from pie.errors import ConfigError

GiB = 1 << 30


def measure_cuda_budget(device: torch.device, utilization: float, dry_run: Callable[[], None],
                        scratch_bytes: int) -> tuple[int, int]:
    """(bytes for KV, measured activation peak) on `device`, called once the weights are loaded.

    Free memory is read after emptying the allocator cache; `dry_run` then runs
    the largest batches once so the activation and workspace peak is measured,
    not guessed; `scratch_bytes` (the temporary KV pool the dry run allocates)
    is not part of that peak. The KV pool gets `utilization` of the free
    memory minus the peak.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    peak = max(_peak_of(device, dry_run) - scratch_bytes, 0)
    torch.cuda.empty_cache()
    return int(free * utilization) - peak, peak


def _peak_of(device: torch.device, fn: Callable[[], None]) -> int:
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def num_pages_for(budget_bytes: int, shape: KVShape, cap: int, where: str) -> int:
    pages = budget_bytes // shape.bytes_per_page
    if cap > 0:
        pages = min(pages, cap)
    if pages < 1:
        need = shape.bytes_per_page / GiB
        raise ConfigError(
            f"no memory left for the KV cache on {where}: one page needs {need:.4f} GiB, budget is "
            f"{max(budget_bytes, 0) / GiB:.3f} GiB; raise gpu_mem_utilization (CUDA) or cpu_kv_budget_gb "
            "(CPU/MPS), lower max_batch_tokens, or use a smaller model"
        )
    return int(pages)
