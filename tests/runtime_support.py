"""Drive the runtime through the Host protocol, the way the SDK does (reserve, forward, commit).

Used by the runtime tests until they can go through `inferlet` itself; the
calls are the same ones the SDK makes, so this is the real path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferlet._host import Host, PassDict
from pie.engine.config import EngineConfig
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits

ARGMAX = {"kind": "argmax"}
# These tests drive suspension and swapping from one instance: it may hold the whole pool.
WHOLE_POOL = RuntimeLimits(max_page_share_per_instance=0.0)


async def start_runtime(model_dir: Path | str, limits: RuntimeLimits | None = None, **engine: Any) -> Runtime:
    cfg = {"model": str(model_dir), "device": "cpu", "max_num_kv_pages": 256, **engine}
    return await Runtime.start(RuntimeConfig((ModelSpec("tiny", EngineConfig(**cfg)),), limits or WHOLE_POOL))


def seq_len(host: Host, ctx: int) -> int:
    committed, _, working_tokens = host.ctx_state(ctx)
    return committed * host.ctx_page_size(ctx) + working_tokens


async def forward(host: Host, ctx: int, tokens: list[int], slots: list[dict[str, Any]] | None = None,
                  **extra: Any) -> list[Any]:
    """One pass appending `tokens` at the next positions: reserve pages, run it, commit full pages."""
    ps = host.ctx_page_size(ctx)
    _, working, working_tokens = host.ctx_state(ctx)
    need = -(-(working_tokens + len(tokens)) // ps) - working
    if need > 0:
        host.ctx_reserve(ctx, need)
    start = seq_len(host, ctx)
    spec: PassDict = {"tokens": tokens, "positions": list(range(start, start + len(tokens))),
                      "slots": slots or [], **extra}  # type: ignore[typeddict-item]
    values = await host.ctx_forward(ctx, spec)
    _, _, working_tokens = host.ctx_state(ctx)
    if working_tokens // ps:
        host.ctx_commit(ctx, working_tokens // ps)
    return values


def argmax_at(row: int) -> dict[str, Any]:
    return {"indices": [row], "sampler": ARGMAX}


def logits_at(row: int) -> dict[str, Any]:
    return {"index": row, "probe": {"kind": "logits"}}


async def greedy(host: Host, ctx: int, prompt: list[int], num_new: int) -> list[int]:
    """Feed `prompt`, then generate `num_new` tokens greedily (the last one is not fed back)."""
    token = (await forward(host, ctx, prompt, [argmax_at(len(prompt) - 1)]))[0]
    out = [token]
    for _ in range(num_new - 1):
        token = (await forward(host, ctx, [token], [argmax_at(0)]))[0]
        out.append(token)
    return out


async def run(runtime: Runtime, body: Any, username: str = "alice") -> Any:
    """Run `body(host)` as an instance of `username`; its value (an error of the instance fails the test)."""
    box: dict[str, Any] = {}

    async def wrapper(instance: Instance) -> str:
        box["value"] = await body(instance.host)
        return "ok"

    final = await runtime.spawn(wrapper, program="test", username=username).wait()
    assert final.kind == "return", final.value
    return box["value"]
