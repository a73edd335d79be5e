"""Engine configuration: what one engine instance (one model, one device group) needs.

The server's `pie.config` maps the user's TOML onto this; the engine takes
nothing else. Frozen; derived values are computed by `resolve_*` helpers, never
filled in later.
"""

from __future__ import annotations

from dataclasses import dataclass

from pie.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_DTYPES = (*DTYPES, "int8", "int4", "float8")
ATTENTION_BACKENDS = ("auto", "torch_ref", "flashinfer")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "Qwen/Qwen3-0.6B"  # HF repo id, local directory, or a built-in id (pie/tiny-random)
    device: str = "auto"  # "auto" -> cuda:0, then mps, then cpu
    activation_dtype: str = "auto"
    weight_dtype: str = "auto"
    kv_page_size: int = 16
    max_batch_tokens: int = 10240
    max_batch_size: int = 512
    max_dist_size: int = 32
    max_num_embeds: int = 128
    max_num_kv_pages: int = 0  # 0 = as many as memory allows
    gpu_mem_utilization: float = 0.8
    cpu_kv_budget_gb: float = 2.0  # KV pool size on CPU/MPS, where free memory is not measurable
    attention_backend: str = "auto"
    # torch_ref on the CPU: decode rows through the paged C++ kernel (cpu_paged); False: gather pages (reference).
    cpu_paged_attention: bool = True
    use_cuda_graphs: bool = False
    max_num_adapters: int = 32
    max_adapter_rank: int = 8
    runtime_quant: str = ""
    swap_pool_size: int = 0  # pinned host pages for KV swap; 0 disables
    cpu_mem_budget_in_gb: float = 0.0  # alternative to swap_pool_size: host swap pool size in GiB
    dummy_weights: bool = False  # random weights of the right shapes (benchmarks)
    seed: int = 0  # engine RNG for requests that carry no seed
    revision: str | None = None  # HF revision for repo ids
    # Ranks one copy of the model is split over (heads, MLP columns, vocabulary); > 1 runs in worker processes
    # (pie.runtime.worker_client.WorkerEngine), one per rank, joined through torch.distributed.
    tensor_parallel_size: int = 1
    # Device of each rank when tensor_parallel_size > 1 (rank i on tp_devices[i]); () = `device` for every rank.
    tp_devices: tuple[str, ...] = ()
    # Prepared images and, separately, their vision-tower outputs, each kept by content hash within this budget.
    image_cache_mb: int = 512
    # Hybrid models: recurrent-state slots (one per live sequence, fork and checkpoint); 0 = 2 x max_batch_size,
    # at most half the memory budget. Their bytes come out of the budget before the KV pages.
    max_num_state_slots: int = 0
    state_swap_pool_size: int = 0  # host slots for suspended sequences' states; 0 disables

    def __post_init__(self) -> None:
        _check_choice("activation_dtype", self.activation_dtype, DTYPES)
        _check_choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.kv_page_size < 1:
            raise ConfigError(f"kv_page_size must be >= 1, got {self.kv_page_size}")
        for name in ("max_batch_tokens", "max_batch_size", "max_dist_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.gpu_mem_utilization <= 1.0:
            raise ConfigError(
                f"gpu_mem_utilization must be in (0, 1], got {self.gpu_mem_utilization}"
            )
        if self.max_num_state_slots < 0 or self.state_swap_pool_size < 0:
            raise ConfigError("max_num_state_slots and state_swap_pool_size must be >= 0 (0 = automatic / off)")
        if self.swap_pool_size < 0 or self.cpu_mem_budget_in_gb < 0:
            raise ConfigError("swap_pool_size and cpu_mem_budget_in_gb must be >= 0 (0 disables KV swap)")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tp_devices and len(self.tp_devices) != self.tensor_parallel_size:
            raise ConfigError(f"tp_devices names {len(self.tp_devices)} device(s) for tensor_parallel_size = "
                              f"{self.tensor_parallel_size}; name one per rank")
        if self.runtime_quant not in ("", "fp8"):
            raise ConfigError(f"runtime_quant must be '' or 'fp8', got {self.runtime_quant!r}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")
