"""What the runtime learns about a loaded engine: plain data, torch-free (it crosses the worker pipe)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineInfo:
    """What the runtime needs to know about a loaded engine."""

    model_name: str
    model_dir: str
    model_type: str
    device: str
    dtype: str
    attention_backend: str
    num_pages: int
    page_size: int
    vocab_size: int
    num_layers: int
    max_batch_tokens: int
    max_batch_size: int
    max_dist_size: int
    max_num_embeds: int
    kv_bytes_per_page: int  # on one rank: under tensor parallelism each rank holds its kv heads' share
    num_swap_slots: int = 0
    tensor_parallel_size: int = 1
    # Hybrid models: the recurrent-state pool (0 for dense models). A slot holds one sequence's state, whatever
    # its length (`pie.engine.state_pool`); every Request then names one (`Request.state_slot`).
    num_state_slots: int = 0
    state_bytes_per_slot: int = 0
    num_state_swap_slots: int = 0
