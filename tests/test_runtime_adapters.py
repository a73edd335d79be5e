"""The runtime's named LoRA adapters (`pie.runtime.adapters.AdapterStore`) on real engines.

Two in-process engines stand for two data-parallel groups: every adapter must sit in the same slot
on both, so a context on either group can use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from lora_helpers import make_adapter

from pie.engine.config import EngineConfig
from pie.errors import AdapterError
from pie.runtime.adapters import AdapterStore
from pie.runtime.engine_client import InProcessEngine


@pytest.fixture(scope="module")
def engines(checkpoint_dir) -> Iterator[list[InProcessEngine]]:  # type: ignore[no-untyped-def]
    config = EngineConfig(model=str(checkpoint_dir("qwen3")), device="cpu", max_num_kv_pages=32,
                          max_num_adapters=3, max_adapter_rank=4)
    clients = [asyncio.run(InProcessEngine.start(config)) for _ in range(2)]
    yield clients
    for client in clients:
        asyncio.run(client.close())


@pytest.fixture
def store(engines: list[InProcessEngine], checkpoint_dir, tmp_path: Path) -> Iterator[AdapterStore]:  # type: ignore[no-untyped-def]
    base = checkpoint_dir("qwen3")
    make_adapter(base, tmp_path / "shared-a", seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    make_adapter(base, tmp_path / "alice" / "mine", seed=2, r=4, lora_alpha=4, target_modules=["o_proj"])
    make_adapter(base, tmp_path / "big", seed=3, r=8, lora_alpha=8, target_modules=["q_proj"])
    store = AdapterStore(engines, tmp_path, model="qwen3")
    yield store
    for engine in engines:  # the engines outlive each test: free their slots
        for slot in list(engine.engine.adapters.resident()):
            engine.unload_adapter(slot)


def test_load_puts_the_adapter_in_the_same_slot_on_every_engine(store: AdapterStore,
                                                                engines: list[InProcessEngine]) -> None:
    a = store.create("alice", "a")
    store.load(a, "shared-a")  # the shared folder
    b = store.create("alice", "b")
    store.load(b, "mine")  # alice's own folder
    assert (store.slot_of(a), store.slot_of(b)) == (0, 1)
    for engine in engines:
        assert engine.engine.adapter_info(0).rank == 2 and engine.engine.adapter_info(1).rank == 4
    assert b.source.endswith("alice/mine")


def test_names_are_per_user(store: AdapterStore) -> None:
    a = store.create("alice", "x")
    assert store.open("alice", "x") is a and store.open("bob", "x") is None
    store.create("bob", "x")  # the same name, another user: another adapter
    with pytest.raises(AdapterError, match="already exists"):
        store.create("alice", "x")
    with pytest.raises(AdapterError, match=r"looked in .*bob/mine"):  # alice's folder is not bob's
        store.load(store.open("bob", "x"), "mine")  # type: ignore[arg-type]


def test_paths_stay_inside_the_adapter_folder(store: AdapterStore) -> None:
    a = store.create("alice", "a")
    for path in ("/etc", "../big", "alice/../../x"):
        with pytest.raises(AdapterError, match="must be relative"):
            store.load(a, path)


def test_rank_over_the_limit_is_refused_and_the_adapter_is_unchanged(store: AdapterStore) -> None:
    a = store.create("alice", "a")
    with pytest.raises(AdapterError, match="max_adapter_rank"):
        store.load(a, "big")
    assert a.slot is None
    with pytest.raises(AdapterError, match="no weights yet"):
        store.slot_of(a)
    store.load(a, "shared-a")  # the engines went on
    assert store.slot_of(a) == 0


def test_fork_copies_and_save_writes_a_peft_folder_under_the_user(store: AdapterStore, tmp_path: Path,
                                                                  engines: list[InProcessEngine]) -> None:
    a = store.create("alice", "a")
    store.load(a, "shared-a")
    b = store.fork(a, "b")
    assert store.slot_of(b) != store.slot_of(a)
    for engine in engines:
        assert engine.engine.adapter_info(store.slot_of(b)).rank == 2
    where = store.save(b, "saved/b")
    assert where == tmp_path / "alice" / "saved" / "b" and (where / "adapter_config.json").is_file()
    c = store.create("alice", "c")
    store.load(c, "saved/b")  # what was saved loads back
    assert engines[1].engine.adapter_info(store.slot_of(c)).rank == 2
    with pytest.raises(AdapterError, match="all 3 adapter slots are in use"):
        store.load(store.create("alice", "d"), "shared-a")
