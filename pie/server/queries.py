"""`query {subject, record}`: read-only questions about the server, answered as JSON text.

- `model_status`: per model, KV pages used/total, tokens processed, batches, latest batch latency
- `models`: the served model names
- `programs` (alias `inferlets`): installed inferlets with name, version, description, parameters
- `backend_stats`: the `model_status` numbers as `key | value` lines (Pie's text form)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from pie.errors import RequestError
from pie.runtime.api import RuntimeAPI


def model_status(runtime: RuntimeAPI) -> dict[str, dict[str, Any]]:
    return {
        m.name: {
            "model_type": m.model_type,
            "device": m.device,
            "kv_pages_used": m.pages_used,
            "kv_pages_total": m.pages_total,
            "tokens_processed": m.tokens_processed,
            "batches": m.batches,
            "last_batch_ms": m.last_batch_ms,
        }
        for m in runtime.models()
    }


def _backend_stats(runtime: RuntimeAPI) -> str:
    rows = [(f"{name}.{key}", value) for name, stats in model_status(runtime).items() for key, value in stats.items()]
    return "".join(f"{key:<40} | {value}\n" for key, value in sorted(rows))


def _programs(runtime: RuntimeAPI) -> str:
    return json.dumps([dataclasses.asdict(p) for p in runtime.programs()])


SUBJECTS: dict[str, Callable[[RuntimeAPI], str]] = {
    "model_status": lambda runtime: json.dumps(model_status(runtime)),
    "models": lambda runtime: json.dumps([m.name for m in runtime.models()]),
    "programs": _programs,
    "inferlets": _programs,
    "backend_stats": _backend_stats,
}


def answer_query(runtime: RuntimeAPI, subject: str, record: str) -> str:
    answer = SUBJECTS.get(subject)
    if answer is None:
        raise RequestError(f"unknown query subject {subject!r}; known subjects: {', '.join(sorted(SUBJECTS))}")
    return answer(runtime)
