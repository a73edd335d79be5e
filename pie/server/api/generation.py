"""Running a `Plan` on the `openai-compat` inferlet and reading its events back, for every HTTP API.

`launch` starts the process; `run` yields `Delta`s (streamed text of one choice) and finally one
`Outcome`; an inferlet failure raises `GenerationFailed` with the failure's last line (the whole
traceback goes to the server log, never to the client). `finished` terminates a process the HTTP
client left before the end, which frees its pages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pie.errors import ProgramError, RequestError
from pie.runtime.api import ProcessAPI
from pie.server import processes
from pie.server.api.plan import Plan
from pie.server.metrics import RequestTimer
from pie.server.state import ServerState

PROGRAM = "openai-compat"
log = logging.getLogger("pie.server.api")

LogprobEntry = list[Any]  # [token, logprob, [[token, logprob], ...]]


class GenerationFailed(RequestError):
    """The inferlet failed mid-generation (a 500 for the client)."""


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    logprobs: list[LogprobEntry] = field(default_factory=list)
    tokens: tuple[int, ...] = ()  # the step's token ids (harmony plans ask for them)
    prompt_logprobs: list[LogprobEntry] | None = None  # prompt tokens 1.. (echo), before any generated text


@dataclass(frozen=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[LogprobEntry]
    stop_string: str | None = None
    prompt_logprobs: list[LogprobEntry] = field(default_factory=list)  # prompt tokens 1.. (echo)
    tokens: tuple[int, ...] = ()  # the generated token ids (harmony plans ask for them)


@dataclass(frozen=True)
class Outcome:
    choices: list[ChoiceResult]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


async def launch(state: ServerState, plan: Plan, username: str) -> ProcessAPI:
    # The standard inferlet by its content hash: no upload of the same name@version can stand in.
    try:
        program = state.runtime.standard_program(PROGRAM)
    except ProgramError as error:  # the standard library lacks it: the routes answer 503
        raise RequestError(str(error)) from None
    return await processes.launch(state, program, plan.inferlet_input(), username=username)


async def run(process: ProcessAPI, timer: RequestTimer | None = None) -> AsyncIterator[Delta | Outcome]:
    """The process's deltas, then its outcome; `timer` sees the start and every step."""
    async for event in process.events():
        if event.kind == "message":
            delta = _delta(event.value)
            if delta is None:
                if timer is not None:
                    timer.started()
            elif delta.prompt_logprobs is not None:
                yield delta  # the prefill's scores: no generated token to time
            else:
                if timer is not None:
                    timer.token()
                if delta.text or delta.logprobs or delta.tokens:
                    yield delta
        elif event.kind == "return":
            yield _outcome(event.value)
            return
        elif event.kind == "error":
            raise _failure(process, event.value)
    final = await process.wait()  # the events went to another subscriber; the outcome still stands
    if final.kind == "return":
        yield _outcome(final.value)
    else:
        raise _failure(process, final.value)


async def collect(process: ProcessAPI, timer: RequestTimer | None = None) -> Outcome:
    async for item in run(process, timer):
        if isinstance(item, Outcome):
            return item
    raise GenerationFailed("the generation ended without a result")


async def finished(process: ProcessAPI) -> None:
    if process.status == "running":  # the HTTP client left early
        await process.terminate("the HTTP client disconnected")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _delta(value: str | bytes) -> Delta | None:
    try:
        message = json.loads(_text(value))
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict) or "i" not in message:
        return None  # {"started": true}
    scored = message.get("prompt_logprobs")
    return Delta(int(message.get("i", 0)), str(message.get("delta", "")), list(message.get("logprobs") or []),
                 tuple(int(t) for t in message.get("tokens") or ()), None if scored is None else list(scored))


def _outcome(value: str | bytes) -> Outcome:
    result = json.loads(_text(value))
    choices = [ChoiceResult(int(c["index"]), str(c["text"]), str(c["finish_reason"]), int(c["completion_tokens"]),
                            list(c.get("logprobs") or []), c.get("stop_string"), list(c.get("prompt_logprobs") or []),
                            tuple(int(t) for t in c.get("tokens") or ()))
               for c in result["choices"]]
    return Outcome(sorted(choices, key=lambda c: c.index), sum(int(p) for p in result["prompt_tokens"]))


def _failure(process: ProcessAPI, value: str | bytes) -> GenerationFailed:
    text = _text(value).strip()
    log.warning("generation %s failed: %s", process.id, text)
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "unknown error")
    return GenerationFailed(f"generation failed: {last[:500]}")
