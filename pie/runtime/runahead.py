"""Run-ahead token streams: the runtime keeps a plain sampling loop going without the inferlet.

`Host.ctx_generate_start(ctx, spec)` hands the runtime a decode loop whose next pass depends on nothing but
the token just sampled: the buffered tokens, one sampler, stop tokens, a token limit and optionally a fixed
logit mask, seed and adapter. From then on each completed step appends its token to the context and
submits the next one-token pass synchronously, from inside the scheduler's hand-back of the batch
(`JobOwner.completed`), so it is in the very next batch whether or not the inferlet's task has woken.

The inferlet reads the tokens with `stream_next` (every token produced so far, at least one) and ends the
stream with `stream_stop(consumed)`: the runtime drops what it ran ahead and cuts the context back to
exactly the state of the step-by-step loop after `consumed` steps (`TokenStream.stop`).

Chaining: with a pipelining scheduler, while a step is in flight the scheduler asks for the step after
it (`chain`) and runs it in the next batch with its token read from the step's output; when the step
lands, the chained step becomes the stream's pending pass, or, if the token was a stop token, is
cancelled and its slot cut back.

Bounds: a stream runs at most `depth` steps ahead of what `stream_next` delivered, and stops by itself
after a stop token or `max_tokens` tokens, so it never computes far past the end. Pages come from the
context's own reservation, grown one page at a time under the instance's page limit as the step-by-step
loop's `_reserve_for` would; the token budget is charged per step and refunded for discarded steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from inferlet._host import HostError
from pie.engine.batch import OutputSpec, OutputValue, Sampler
from pie.runtime.context import Context
from pie.runtime.jobs import Job

if TYPE_CHECKING:
    from pie.runtime.scheduler import Scheduler

DEFAULT_DEPTH = 8


class TokenStream:
    """One run-ahead loop on one context. Implements `pie.runtime.jobs.JobOwner`."""

    def __init__(self, ctx: Context, scheduler: Scheduler, job: Job, sampler: Sampler, *, stop: frozenset[int],
                 max_tokens: int, depth: int, base_len: int, base_pages: int, batch: int = 1,
                 grow: Callable[[Context, int], None], charge: Callable[[int], None] | None) -> None:
        """`job`: the first pass (the buffered tokens, already recorded on `ctx`, sampling at its last row).
        `grow(ctx, n)`: make room for n more slots (reserve under the instance's limits, or raise HostError);
        `charge(n)`: count n sampled tokens against the token budget (negative: refund), or raise; None
        when the instance has no budget (nothing to count)."""
        self.ctx = ctx
        self._scheduler = scheduler
        self._job = job
        self._step_outputs = [OutputSpec(0, sampler=sampler)]
        self._stop = stop
        self._max_tokens = max_tokens
        self._depth = max(1, depth)
        self._batch = min(max(1, batch), self._depth)  # tokens per delivery (fewer only at the end)
        self._base_len = base_len  # kv_len before the stream's first pass
        self._prompt_len = job.end - job.start
        self._base_pages = base_pages  # pages reserved before the stream: never released by stop
        self._grow = grow
        self._charge = charge or _no_budget
        self._budgeted = charge is not None  # else `_charge` counts nothing: the hot paths skip the call
        self._capacity = ctx.num_pages * ctx.space.page_size  # slots the reserved pages hold (grows with them)
        self.tokens: list[int] = []  # token sampled at each step, in order
        self._delivered = 0  # tokens handed out by `next`
        self._charged = 1  # tokens charged: the first pass's
        self._error: BaseException | None = None
        self._ended = False  # no more steps will be produced (stop token, limit, error or stop())
        self._waiter: asyncio.Future[None] | None = None
        self._chained: Job | None = None  # the step after the one in flight, already in the next batch
        self._spare = Job(ctx, 0, 0, self._step_outputs, logit_mask=job.logit_mask, adapter=job.adapter,
                          seed=job.seed, owner=self)  # the job the next chained step reuses
        job.owner = self
        scheduler.submit(job)

    # -- the scheduler's side (JobOwner) --------------------------------------------------------

    def completed(self, job: Job, results: list[OutputValue]) -> None:
        token = results[0]
        assert type(token) is int, "a stream samples one token per step"
        tokens = self.tokens
        tokens.append(token)
        chained = self._chained
        if chained is not None:  # the next step runs already, reading this token
            self._chained = None
            ctx = self.ctx
            ctx.tokens[chained.start] = token
            if token in self._stop:
                self._ended = True
                chained.cancelled = True
                ctx.rollback(chained.start)
            else:
                self._job, self._spare = chained, job
                self._scheduler.adopt(chained)
        elif token in self._stop or len(tokens) >= self._max_tokens:
            self._ended = True
        elif len(tokens) - self._delivered < self._depth:
            self._next_pass()
        if self._waiter is not None and (self._ended or len(tokens) - self._delivered >= self._batch):
            self._wake()

    def chain(self, job: Job) -> Job | None:
        """The step after `job` (in flight), recorded with a placeholder token, to run in the next batch
        reading `job`'s output; None if the stream stops after `job` whatever it samples."""
        if self._ended or job is not self._job or self._chained is not None:
            return None
        n = len(self.tokens) + 1  # tokens once `job` lands
        if n >= self._max_tokens or n - self._delivered >= self._depth:
            return None
        ctx = self.ctx
        slot = len(ctx.tokens)
        if slot >= self._capacity or self._budgeted:
            try:  # a failure is reported by the step after `job` (`_next_pass`), once `job` lands
                self._room_for_one(slot)
            except HostError:
                return None
        self._charged += 1
        if job.adapter is None:
            ctx.tokens.append(0)  # the placeholder, filled in `completed`
            ctx.positions.append(slot)
        else:
            ctx.append((0,), (slot,), custom_kv=True)
        nxt = self._spare
        if nxt.outputs is self._step_outputs:
            nxt.start, nxt.end = slot, slot + 1
            nxt.results[0] = None
            nxt.cancelled = False
        else:  # the first pass's job, now the spare: one row, sampled at row 0
            nxt.reset(slot, slot + 1, self._step_outputs)
        self._chained = nxt
        return nxt

    def unchain(self, nxt: Job) -> None:
        """The scheduler could not place the chained step: undo `chain`."""
        self._chained = None
        self.ctx.rollback(nxt.start)
        self._charge(-1)
        self._charged -= 1

    def failed(self, job: Job, error: BaseException) -> None:
        """The step's pass failed (engine error, shutdown): undo its input; deliver the error after the
        tokens produced before it."""
        if job is self._chained:
            self._chained = None
        if not self.ctx.closed and self.ctx.kv_len > job.start:
            self.ctx.rollback(job.start)
        self._drop_chained()
        self._end_with(error)

    # -- the inferlet's side --------------------------------------------------------------------

    async def next(self) -> list[int]:
        """Every token produced since the last call (at least `batch`, or what is left at the end, waiting
        for them); [] once the stream ended and everything was delivered; raises the error that ended it
        after its tokens."""
        while len(self.tokens) - self._delivered < self._batch:
            if self._ended:
                if self._delivered < len(self.tokens):
                    break
                if self._error is not None:
                    raise self._error
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = self.tokens[self._delivered:]
        self._delivered = len(self.tokens)
        if not self._ended and not self.ctx.pending:  # paused at its depth: go on
            self._next_pass()
        return out

    def stop(self, consumed: int) -> None:
        """End the stream; leave the context as the step-by-step loop leaves it after `consumed` steps:
        the buffered tokens and the first `consumed - 1` sampled tokens in the record and KV (the last
        consumed token stays in the SDK's buffer), the pages it reserved beyond that released."""
        if not 0 <= consumed <= len(self.tokens):
            raise HostError(f"stream_stop: consumed {consumed} steps, but the stream produced {len(self.tokens)}")
        self._ended = True
        self._scheduler.forget(self._job)
        self._drop_chained()
        ctx = self.ctx
        self._charge(consumed - self._charged)
        self._charged = consumed
        self._wake()
        if ctx.closed:
            return
        keep = self._base_len if consumed == 0 else self._base_len + self._prompt_len + consumed - 1
        if ctx.kv_len > keep:
            ctx.rollback(keep)
        ps = ctx.space.page_size
        extra = ctx.num_pages - max(self._base_pages, -(-keep // ps))
        if extra > 0:
            ctx.release(extra)

    def close(self) -> None:
        """End the stream without touching the context (it is being destroyed with its instance)."""
        self._ended = True
        self._scheduler.forget(self._job)
        self._drop_chained()
        self._wake()

    def _drop_chained(self) -> None:
        if self._chained is not None:
            self._chained.cancelled = True  # its batch lands without effect
            self._chained = None

    # -- helpers --------------------------------------------------------------------------------

    def _next_pass(self) -> None:
        """Append the last token and submit its one-row pass (the job is reused)."""
        ctx, token, job = self.ctx, self.tokens[-1], self._job
        slot = len(ctx.tokens)
        try:
            self._room_for_one(slot)
        except HostError as error:
            self._end_with(error)
            return
        self._charged += 1
        if job.adapter is None:  # sequential positions, base-model KV: nothing for `append` to mark
            ctx.tokens.append(token)
            ctx.positions.append(slot)
        else:
            ctx.append((token,), (slot,), custom_kv=True)
        if job.outputs is self._step_outputs:
            job.start, job.end = slot, slot + 1
            job.results[0] = None
            job._next = 0
            self._scheduler.resubmit(job)
        else:  # after the first pass: one row, sampled at row 0
            job.reset(slot, slot + 1, self._step_outputs)
            self._scheduler.submit(job)

    def _room_for_one(self, slot: int) -> None:
        """A page for `slot` if the reservation ends before it, and one token of budget; or HostError."""
        ctx = self.ctx
        if slot >= ctx.num_pages * ctx.space.page_size:
            self._grow(ctx, 1)
        self._capacity = ctx.num_pages * ctx.space.page_size
        self._charge(1)

    def _end_with(self, error: BaseException) -> None:
        self._ended = True
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _no_budget(n: int) -> None:
    """The charge of an instance without a token budget: nothing to count."""
