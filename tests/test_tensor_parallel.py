"""Tensor parallelism on CPU: two gloo ranks in real worker processes against the single-device engine.

One worker group per model for the whole module: llama (untied LM head, vocabulary split evenly) with
both ranks spawned by `WorkerEngine`, and qwen3 (q/k norm, tied embeddings, an odd vocabulary that pads
the last rank's block) whose rank 1 is started on its own from the torchrun-style environment, the way a
rank on another host joins.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from checkpoints import VOCAB, config_for
from engine_helpers import (
    SeqPager,
    all_row_logits,
    greedy_generate,
    logits_of,
    make_engine,
    random_prompts,
    rel_err,
)
from timing import scaled
from tp_helpers import ENGINE, SyncWorkers, start_local, tp_config

from pie.engine import wire
from pie.engine.batch import BatchResult, ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.engine.models.registry import get_architecture
from pie.engine.parallel import TPGroup
from pie.errors import BatchError, ConfigError, EngineWorkerError
from pie.runtime.worker_client import Rendezvous, WorkerEngine

ODD_VOCAB = VOCAB - 3  # 509 ids: blocks of 255 on each rank, the last one padded by one row


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def llama(checkpoint_dir) -> Iterator[tuple[Path, SyncWorkers]]:
    d = checkpoint_dir("llama")
    workers = start_local(d)
    yield d, workers
    workers.close()


@pytest.fixture(scope="module")
def qwen3(checkpoint_dir) -> Iterator[tuple[Path, SyncWorkers]]:
    """Rank 0 from WorkerEngine with one local device; rank 1 joins on its own from the environment,
    at the port WorkerEngine bound (port 0: whatever was free) and reported before waiting for the ranks."""
    d = checkpoint_dir("qwen3", vocab_size=ODD_VOCAB)
    remote: list[subprocess.Popen[bytes]] = []

    def start_rank_1(addr: str, port: int) -> None:
        env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
        remote.append(subprocess.Popen([sys.executable, "-m", "pie.engine.worker"], env=env,
                                       stdout=subprocess.DEVNULL))

    try:
        engine = asyncio.run(WorkerEngine.start(tp_config(d), ["cpu"], "tp", rendezvous=Rendezvous("127.0.0.1", 0),
                                                on_listening=start_rank_1))
        workers = SyncWorkers(engine)
        yield d, workers
        workers.close()
        assert remote[0].wait(timeout=scaled(30)) == 0  # rank 0's close reached the rank it did not spawn
    finally:
        for proc in remote:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(params=["llama", "qwen3"])
def model(request: pytest.FixtureRequest) -> tuple[Path, SyncWorkers]:
    return request.getfixturevalue(request.param)


def test_info_reports_the_group(model: tuple[Path, SyncWorkers]) -> None:
    d, workers = model
    single = make_engine(d, **ENGINE)
    assert workers.info.tensor_parallel_size == 2
    assert workers.info.num_pages == single.info.num_pages
    assert workers.info.vocab_size == single.info.vocab_size
    assert workers.info.kv_bytes_per_page * 2 == single.info.kv_bytes_per_page  # each rank holds half the kv heads


def test_logits_match_single_device(model: tuple[Path, SyncWorkers]) -> None:
    d, workers = model
    prompts = random_prompts(5, ODD_VOCAB, 1, 40, seed=11)
    ours = all_row_logits(workers, prompts)  # type: ignore[arg-type]
    reference = all_row_logits(make_engine(d, **ENGINE), prompts)
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4


def test_greedy_tokens_match_single_device(model: tuple[Path, SyncWorkers]) -> None:
    d, workers = model
    prompts = random_prompts(6, ODD_VOCAB, 2, 30, seed=12)
    ours = greedy_generate(workers, prompts, 24)  # type: ignore[arg-type]
    assert ours == greedy_generate(make_engine(d, **ENGINE), prompts, 24)
    assert len({tuple(seq) for seq in ours}) > 1  # the prompts really lead to different continuations


def test_sampled_tokens_and_probes_match_single_device(llama: tuple[Path, SyncWorkers]) -> None:
    """Seeded sampling and distributions read the gathered logits: the same values as one device."""
    d, workers = llama
    outputs = [OutputSpec(5, Sampler("top_k", 0.8, top_k=20)), OutputSpec(5, Sampler("multinomial", draws=3)),
               OutputSpec(5, probe=Probe("distribution", k=5)), OutputSpec(3, probe=Probe("entropy"))]
    prompt = random_prompts(1, VOCAB, 6, 6, seed=13)[0]

    def run(engine: Any) -> list[Any]:
        req = SeqPager(engine).request(0, prompt, outputs, seed=7)
        return engine.forward_batch(ForwardBatch([req])).outputs[0]

    ours, reference = run(workers), run(make_engine(d, **ENGINE))
    assert ours[:2] == reference[:2]
    assert ours[2][0] == reference[2][0]
    assert np.allclose(ours[2][1], reference[2][1], atol=1e-5)
    assert abs(ours[3] - reference[3]) < 1e-4


def test_page_copies_run_on_every_rank(llama: tuple[Path, SyncWorkers]) -> None:
    """A fork's copied pages hold each rank's kv heads: decoding from the copy equals the original."""
    _, workers = llama
    prompt = random_prompts(1, VOCAB, 10, 10, seed=14)[0]  # pages 0..2 (page size 4), last one half full
    decode = [OutputSpec(0, probe=Probe("logits"))]
    pager = SeqPager(workers)  # type: ignore[arg-type]
    workers.forward_batch(ForwardBatch([pager.request(0, prompt, [])]))
    workers.copy_pages([0, 1], [100, 101])
    forked = Request([prompt[-1]], [10], [100, 101, 102], 3, decode)
    original = Request([prompt[-1]], [10], [0, 1, 2], 3, decode)
    # The working page is copied by the batch itself (page_copies run before the requests).
    result = workers.forward_batch(ForwardBatch([forked, original], page_copies=[(2, 102)]))
    a, b = (logits_of(out[0]) for out in result.outputs)  # type: ignore[arg-type]
    assert rel_err(a, b) < 1e-6


def test_bad_batch_raises_batch_error_and_the_workers_keep_serving(llama: tuple[Path, SyncWorkers]) -> None:
    _, workers = llama
    prompt = random_prompts(1, VOCAB, 8, 8, seed=15)
    before = all_row_logits(workers, prompt)  # type: ignore[arg-type]
    with pytest.raises(BatchError, match="page id 9999"):
        workers.forward_batch(ForwardBatch([Request([5], [0], [9999], 1)]))
    with pytest.raises(BatchError, match="outside the pool"):
        workers.copy_pages([0], [9999])
    assert rel_err(all_row_logits(workers, prompt)[0], before[0]) < 1e-6  # type: ignore[arg-type]


def test_a_dead_rank_is_an_error_not_a_hang_and_close_leaves_no_process(checkpoint_dir) -> None:
    workers = start_local(checkpoint_dir("llama"))
    pids = workers.engine.pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(pids[1], 9)
    with pytest.raises(EngineWorkerError, match=r"rank 1 .* exited with code -9"):
        workers.forward_batch(ForwardBatch([Request([5], [0], [0], 1)]))
    with pytest.raises(EngineWorkerError, match="stopped"):  # and every call after it
        workers.copy_pages([0], [1])
    workers.close()
    assert not any(_alive(p) for p in pids)


def test_quantized_shards_and_close_stops_every_rank(checkpoint_dir) -> None:
    """int8 on each rank's slice stays close to int8 on the whole matrix (row-parallel scales differ slightly)."""
    d = checkpoint_dir("llama")
    workers = start_local(d, weight_dtype="int8")
    pids = workers.engine.pids
    try:
        prompts = random_prompts(3, VOCAB, 4, 20, seed=16)
        ours = all_row_logits(workers, prompts)  # type: ignore[arg-type]
    finally:
        workers.close()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(EngineWorkerError, match="closed"):
        workers.forward_batch(ForwardBatch([Request([5], [0], [0], 1)]))
    single = all_row_logits(make_engine(d, **ENGINE, weight_dtype="int8"), prompts)
    full = all_row_logits(make_engine(d, **ENGINE), prompts)
    for a, b, f in zip(ours, single, full, strict=True):
        assert rel_err(a, b) < 0.05
        assert rel_err(a, f) > 1e-6  # the weights really were quantised


def test_unsupported_family_is_refused_at_start_with_the_fix(checkpoint_dir) -> None:
    with pytest.raises(ConfigError, match=r"tensor_parallel_size = 2 is not supported .*set tensor_parallel_size = 1"):
        asyncio.run(WorkerEngine.start(tp_config(checkpoint_dir("gemma4_text")), ["cpu", "cpu"], "gemma4"))


@pytest.mark.parametrize("fused_source", [False, True])
def test_column_shards_keep_each_part_whole_per_rank(fused_source: bool) -> None:
    """Rank r's output is q[r] | k[r] | v[r]: the heads a rank computes are the kv heads it attends with.

    Column-parallel layers need no collective, so both ranks' layers run here side by side; Phi-3's
    checkpoint holds q, k and v in one tensor (`fused_source`), the others one tensor per part.
    """
    import torch

    from pie.engine.layers.sharded import ColumnParallelLinear

    parts = [8, 4, 4]
    weight, x = torch.randn(sum(parts), 6), torch.randn(3, 6)
    sources = [weight] if fused_source else list(weight.split(parts))
    outputs = []
    for rank in (0, 1):
        layer = ColumnParallelLinear(6, parts, TPGroup(rank=rank, size=2), fused_source=fused_source)
        for shard, tensor in enumerate(sources):
            layer.load_shard("weight", tensor, shard, f"source {shard}")
        outputs.append(layer(x).split([p // 2 for p in parts], dim=-1))
    full = (x @ weight.t()).split(parts, dim=-1)
    for whole, rank0, rank1 in zip(full, *outputs, strict=True):
        # A rank's [3, 6] @ [6, 8] and the whole [3, 6] @ [6, 16] are different matmuls: the kernel
        # may block and vectorise the 6-term sums differently, so they agree to a few float32 ulps
        # (eps 1.2e-7 times sums of magnitude ~5: ~1e-6), not bit for bit. A row from the wrong
        # shard or part would be off by O(1), far outside this tolerance.
        torch.testing.assert_close(torch.cat([rank0, rank1], dim=-1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "size", "overrides", "match"), [
    ("llama", 3, {}, "does not divide num_attention_heads = 4"),
    ("llama", 3, {"hidden_size": 96, "num_attention_heads": 6, "intermediate_size": 96},
     "3 is neither a divisor nor a multiple of num_key_value_heads = 2"),
    ("qwen3_moe", 2, {"moe_intermediate_size": 33}, "does not divide moe_intermediate_size = 33"),
    ("gemma4_text", 2, {}, "not supported for Gemma4ForCausalLM: its layers differ in head_dim"),
    ("gemma4_text:moe", 2, {}, "not supported"),
])
def test_unsplittable_models_are_refused(arch: str, size: int, overrides: dict[str, Any], match: str) -> None:
    cls = get_architecture(arch.split(":")[0])
    spec = cls.decoder_spec(config_for(arch, **overrides))
    with pytest.raises(ConfigError, match=match):
        cls.check_tensor_parallel(spec, TPGroup(rank=0, size=size))


def test_a_single_device_engine_refuses_a_tensor_parallel_config(checkpoint_dir) -> None:
    with pytest.raises(ConfigError, match="WorkerEngine"):
        make_engine(checkpoint_dir("llama"), tensor_parallel_size=2)


def test_start_checks_the_devices(checkpoint_dir) -> None:
    cfg = tp_config(checkpoint_dir("llama"))
    with pytest.raises(ConfigError, match="fixed address and port"):
        asyncio.run(WorkerEngine.start(cfg, ["cpu"]))
    with pytest.raises(ConfigError, match="list 1 to 2 devices"):
        asyncio.run(WorkerEngine.start(cfg, ["cpu"] * 3))
    with pytest.raises(ConfigError, match="GPU twice"):
        asyncio.run(WorkerEngine.start(replace(cfg, device="cuda:0"), ["cuda:0", "cuda:0"]))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a fixed rendezvous port someone else holds
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen for the tensor-parallel rendezvous on 127.0.0.1:{port}"):
            asyncio.run(WorkerEngine.start(cfg, ["cpu", "cpu"], rendezvous=Rendezvous("127.0.0.1", port)))


def test_wire_round_trips_the_batch_contract_exactly() -> None:
    batch = ForwardBatch(
        [Request([1, 2], [0, 1], [3], 2, [OutputSpec(1, Sampler("top_p", 0.7, top_p=0.9)),
                                          OutputSpec(0, probe=Probe("logprobs", tokens=(4, 5)))],
                 attention_mask=[[0, 2], [1, 1]], logit_mask=[3, 10], adapter=None, seed=9)],
        page_copies=[(1, 2)], swap_out=[(3, 0)], swap_in=[(0, 4)])
    result = BatchResult([[7, [1, 2], 0.25, ([3, 4], [0.5, 0.25]), b"\x00\x01"]], {"execute_ms": 1.5})
    assert wire.decode(wire.encode(["forward", batch])) == ["forward", batch]
    assert wire.decode(wire.encode(["ok", result])) == ["ok", result]
    with pytest.raises(TypeError, match="cannot cross the engine wire"):
        wire.encode(["ok", object()])


def test_the_server_side_client_imports_no_torch() -> None:
    code = "import sys, pie.runtime.worker_client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
