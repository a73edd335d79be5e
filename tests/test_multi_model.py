"""Several models in one server, configured as `pie serve` reads them (two [[model]] entries).

Each model has its own engine and page pool; an inferlet picks one by name (text-completion's `model`
argument) and gets exactly that model's answer, the one the model gives when served alone. Clients see
both models in `models` and `model_status`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from server_support import running_server

from pie.client import PieClient, ProcessFailed
from pie.config import Config, parse_config
from pie.runtime.runtime import Runtime
from pie.tiny_model import TINY_MODEL_ID

PROMPT = {"prompt": "Name three colours.", "max_tokens": 10}


def served(home: Path, *models: dict[str, Any]) -> Config:
    """A config as `pie serve` would load it from a file with these [[model]] tables."""
    return parse_config({"model": [{"device": ["cpu"], "max_num_kv_pages": 64, **m} for m in models]},
                        source=None, home=home)


async def alone(config: Config) -> str:
    """What the one model of `config` answers to PROMPT in a runtime serving only it."""
    runtime = await Runtime.start(config)
    try:
        process = await runtime.launch("text-completion", json.dumps(PROMPT), username="u")
        final = await process.wait()
    finally:
        await runtime.shutdown(0)
    assert final.kind == "return", final.value
    return str(final.value)


async def test_two_models_in_one_server_answer_independently(checkpoint_dir: Any, tmp_path: Path) -> None:
    tiny = {"name": "tiny", "hf_repo": TINY_MODEL_ID}
    qwen = {"name": "qwen", "hf_repo": str(checkpoint_dir("qwen3")), "kv_page_size": 8}
    expected = {"tiny": await alone(served(tmp_path, tiny)),
                "qwen": await alone(served(tmp_path, qwen))}
    assert expected["tiny"] != expected["qwen"], "the two checkpoints must answer differently for this test"

    async with running_server(served(tmp_path, tiny, qwen)) as server:
        client = PieClient(server.url)
        await client.connect()
        await client.authenticate("alice")
        assert await client.models() == ["tiny", "qwen"]
        # Both launched before either is read: they run side by side, one per engine.
        procs = {name: await client.launch("text-completion", {**PROMPT, "model": name}) for name in expected}
        answers = {name: await proc.result() for name, proc in procs.items()}
        assert answers == expected
        with pytest.raises(ProcessFailed, match=r"no model 'llama' on this server; it serves \['tiny', 'qwen'\]"):
            await (await client.launch("text-completion", {**PROMPT, "model": "llama"})).result()
        status = await client.model_status()
        await client.close()
    assert set(status) == {"tiny", "qwen"}
    assert all(s["tokens_processed"] > 0 and s["kv_pages_total"] == 64 for s in status.values())
