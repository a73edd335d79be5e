"""Tensor parallelism beyond the dense families, and slice loading.

- MoE (Mixtral, Qwen 3 MoE, GPT-OSS: every rank a block of every expert, sinks split like the heads) and
  OLMo 3 (q/k RMSNorm over the whole projection, its sum of squares all-reduced) in two real gloo worker
  processes against the single-device engine: logits within 1e-4, identical greedy tokens.
- More ranks than kv heads (kv heads replicated): qwen3 and OLMo 3 with one kv head on two ranks.
- Loading: a rank reads only its block of every sharded tensor (bytes counted as the loader reads them
  from the real safetensors file), the whole of replicated ones; a wrong shape is still a CheckpointError
  naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import all_row_logits, greedy_generate, make_engine, random_prompts, rel_err
from safetensors import safe_open
from safetensors.torch import save_file
from tp_helpers import ENGINE, start_local

from pie.engine.engine import load_hf_config
from pie.engine.loader import build_model, checkpoint_files, load_weights
from pie.engine.models.registry import get_architecture
from pie.engine.parallel import SINGLE, TPGroup
from pie.errors import CheckpointError

FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "olmo3"]


def _rewrite(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint `src` in `dst` whose tensors `change` edited in place."""
    with safe_open(str(src / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    change(tensors)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _random_expert_biases(tensors: dict[str, torch.Tensor]) -> None:
    """transformers initialises GPT-OSS's expert biases to zero; the down bias must count once over the ranks."""
    gen = torch.Generator().manual_seed(5)
    for name, t in tensors.items():
        if name.endswith("_proj_bias"):
            tensors[name] = torch.randn(t.shape, generator=gen) * 0.1


# More ranks than kv heads: each rank holds the one kv head its query heads use (OLMo 3: and its k_norm block).
ONE_KV_HEAD = [("qwen3", {"num_key_value_heads": 1}), ("olmo3", {"num_key_value_heads": 1})]


@pytest.mark.parametrize(("arch", "overrides"), [*((a, {}) for a in FAMILIES), *ONE_KV_HEAD])
def test_two_ranks_match_one_device(arch: str, overrides: dict[str, Any], checkpoint_dir, tmp_path: Path) -> None:
    d = checkpoint_dir(arch, **overrides)
    if arch == "gpt_oss":
        d = _rewrite(d, tmp_path, _random_expert_biases)
    workers = start_local(d)
    try:
        prompts = random_prompts(4, VOCAB, 1, 30, seed=21)
        greedy_prompts = random_prompts(3, VOCAB, 2, 12, seed=22)
        ours = all_row_logits(workers, prompts)  # type: ignore[arg-type]
        ours_tokens = greedy_generate(workers, greedy_prompts, 16)  # type: ignore[arg-type]
    finally:
        workers.close()
    single = make_engine(d, **ENGINE)
    for a, b in zip(ours, all_row_logits(single, prompts), strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4
    assert ours_tokens == greedy_generate(single, greedy_prompts, 16)


def _load(d: Path, tp: TPGroup) -> tuple[torch.nn.Module, int]:
    """The model of checkpoint `d` as rank `tp.rank` holds it, and the bytes its loader read."""
    hf_config = load_hf_config(d)
    cls = get_architecture(str(getattr(hf_config, "model_type", "")))
    model = build_model(cls, hf_config, torch.float32, torch.device("cpu"), tp)
    return model, load_weights(model, checkpoint_files(d))


def _checkpoint_bytes(d: Path) -> int:
    with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
        return sum(fh.get_tensor(k).nbytes for k in fh.keys())  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.parametrize("arch", ["llama", *FAMILIES])
def test_each_rank_reads_only_its_slice(arch: str, checkpoint_dir) -> None:
    """tp = 1 reads every byte once; each of two ranks about half (replicated norms and routers are small here)."""
    d = checkpoint_dir(arch)
    total = _checkpoint_bytes(d)
    assert _load(d, SINGLE)[1] == total
    per_rank = [_load(d, TPGroup(rank=r, size=2))[1] for r in (0, 1)]
    assert per_rank[0] == per_rank[1]  # even blocks (VOCAB = 512 splits evenly)
    assert total / 2 < per_rank[0] < 0.52 * total


def test_rank_slices_are_the_blocks_of_the_whole_weights(checkpoint_dir) -> None:
    """The ranks' expert and q/k-norm blocks put back together are the single-device weights."""
    d = checkpoint_dir("qwen3_moe")
    whole = dict(_load(d, SINGLE)[0].named_parameters())
    ranks = [dict(_load(d, TPGroup(rank=r, size=2))[0].named_parameters()) for r in (0, 1)]
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"  # [E, 2I, H] gate then up; ranks hold [gate_r | up_r]
    halves = [p[gate_up].chunk(2, dim=1) for p in ranks]
    assert torch.equal(torch.cat([halves[0][0], halves[1][0], halves[0][1], halves[1][1]], dim=1), whole[gate_up])
    down = "model.layers.0.mlp.experts.down_proj"  # [E, H, I]: column blocks
    assert torch.equal(torch.cat([ranks[0][down], ranks[1][down]], dim=2), whole[down])
    router = "model.layers.0.mlp.gate.weight"  # replicated
    assert torch.equal(ranks[1][router], whole[router])


def test_a_wrong_shape_is_named_before_the_slice_is_read(checkpoint_dir, tmp_path: Path) -> None:
    bad = "model.layers.0.mlp.experts.1.down_proj.weight"

    def truncate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[bad] = tensors[bad][:, :-2].contiguous()

    d = _rewrite(checkpoint_dir("qwen3_moe"), tmp_path, truncate)
    with pytest.raises(CheckpointError, match=rf"tensor '{bad}' has shape \(64, 30\), expected \(64, 32\)"):
        _load(d, TPGroup(rank=1, size=2))
