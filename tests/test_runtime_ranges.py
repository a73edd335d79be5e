"""Issue 12: pass values out of their real range fail only the pass that sent them, at the host.

An inferlet sending positions, seeds, top_k, draws, temperatures or probe sizes the engine cannot
execute gets a HostError naming the value, while its neighbours' generations complete unchanged.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from runtime_support import forward, greedy, run, start_runtime

from inferlet._host import HostError
from inferlet.sample import Sampler
from pie.runtime.instance import Instance
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def _sample(**sampler: Any) -> list[dict[str, Any]]:
    return [{"indices": [0], "sampler": {"kind": "top_k", "temperature": 1.0, **sampler}}]


BAD_PASSES: dict[str, tuple[dict[str, Any], str]] = {
    "position 2**63": ({"positions": [2**63]}, "position 9223372036854775808 is outside"),
    "seed float": ({"seed": 1.5}, "seed must be an integer"),
    "top_k 2**62": ({"slots": _sample(top_k=2**62)}, "top_k = 4611686018427387904 is out of range"),
    "draws 2**40": ({"slots": _sample(kind="multinomial", draws=2**40)}, "draws = 1099511627776"),
    "temperature NaN": ({"slots": _sample(temperature=math.nan)}, "temperature = nan"),
    "temperature 1e400": ({"slots": _sample(temperature=10**400)}, "sampler"),
    "top_p 0": ({"slots": _sample(kind="top_p", top_p=0.0)}, "top_p = 0.0 is out of range (0, 1]"),
    "probe k": ({"slots": [{"index": 0, "probe": {"kind": "distribution", "k": 2**40}}]}, "max_dist_size"),
    "probe token": ({"slots": [{"index": 0, "probe": {"kind": "logprob", "tokens": [2**63]}}]}, "vocabulary"),
    "bias token": ({"slots": _sample(logit_bias={"99999999": 1.0})}, "logit_bias token 99999999"),
    "penalty 5": ({"slots": _sample(presence_penalty=5.0, penalty_tokens=[1])}, "presence_penalty = 5.0"),
}


async def test_out_of_range_passes_fail_alone_while_neighbours_complete(tiny: Path) -> None:
    runtime = await start_runtime(tiny)
    prompts = [[3 + i, 40, 41 + i, 90] for i in range(4)]

    async def solo(host: Any, p: list[int]) -> list[int]:
        return await greedy(host, host.ctx_create(""), p, 12)

    alone = [await run(runtime, lambda h, p=p: solo(h, p)) for p in prompts]
    outs: dict[int, list[int]] = {}
    errors: dict[str, str] = {}

    async def neighbour(instance: Instance, i: int) -> str:
        outs[i] = await solo(instance.host, prompts[i])
        return "ok"

    async def attacker(host: Any) -> None:
        for name, (extra, _) in BAD_PASSES.items():
            ctx = host.ctx_create("")
            with pytest.raises(HostError) as info:
                await forward(host, ctx, [5], **extra)
            errors[name] = str(info.value)
            host.ctx_destroy(ctx)

    procs = [runtime.spawn(lambda inst, i=i: neighbour(inst, i), program="gen", username="u") for i in range(4)]
    await run(runtime, attacker, username="mallory")
    finals = await asyncio.gather(*(p.wait() for p in procs))
    assert [f.kind for f in finals] == ["return"] * 4
    assert [outs[i] for i in range(4)] == alone
    for name, (_, message) in BAD_PASSES.items():
        assert message in errors[name], (name, errors[name])
    await runtime.shutdown(0)


async def test_sdk_penalties_and_logit_bias_reach_the_engine(tiny: Path) -> None:
    runtime = await start_runtime(tiny)

    async def body(host: Any) -> list[Any]:
        ctx = host.ctx_create("")
        plain = Sampler.argmax()
        first = (await forward(host, ctx, [7, 8, 9], [{"indices": [2], "sampler": plain.to_dict()}]))[0]
        ctx2 = host.ctx_create("")
        biased = plain.penalized(logit_bias={123: 100.0})
        steered = (await forward(host, ctx2, [7, 8, 9], [{"indices": [2], "sampler": biased.to_dict()}]))[0]
        ctx3 = host.ctx_create("")
        banned = plain.penalized(repetition=1e3, presence=2.0).with_history([first, first])
        other = (await forward(host, ctx3, [7, 8, 9], [{"indices": [2], "sampler": banned.to_dict()}]))[0]
        return [first, steered, other]

    first, steered, other = await run(runtime, body)
    assert steered == 123
    assert other != first
    await runtime.shutdown(0)


async def test_a_priority_must_be_a_finite_number(tiny: Path) -> None:
    rt = await start_runtime(tiny)

    async def body(host: Any) -> list[str]:
        ctx = host.ctx_create("")
        refused = []
        for bad in (math.nan, math.inf, "high", True):
            with pytest.raises(HostError, match="finite number") as caught:
                host.ctx_set_priority(ctx, bad)
            refused.append(str(caught.value))
        host.ctx_set_priority(ctx, 2.5)
        return refused

    try:
        assert len(await run(rt, body)) == 4
    finally:
        await rt.shutdown(0)
