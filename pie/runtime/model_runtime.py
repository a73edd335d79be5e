"""One served model: its data-parallel engine groups, their KV pages, and which group a context lives on.

A model configured with N data-parallel groups runs N engines, each with a
full copy of the weights on its own devices. Page ids mean nothing outside
the engine whose KV pool they index, so each group has its own page pool,
prefix trie, context space and scheduler (`EngineGroup`), and a context stays
on the group holding its pages for its whole life: its forks, the named
snapshots saved from it and every context opened or taken from those
snapshots are made on that group (`Context.fork` creates the child in its
parent's space). Only a fresh context chooses a group (`ModelRuntime.place`).

Named snapshots are one store per model: a user's snapshot names are one
namespace whatever group holds each snapshot.

With one group, the common case, placement is a constant and the per-step path
(host call -> scheduler -> engine) is exactly that of a model without data
parallelism: nothing per step looks at the other groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pie.config import pie_home
from pie.errors import ConfigError, ModelNotFoundError
from pie.runtime.adapters import AdapterStore
from pie.runtime.api import EngineClient, ModelStatus
from pie.runtime.context import Context
from pie.runtime.context_space import ContextSpace
from pie.runtime.pages import PagePool
from pie.runtime.prefix_trie import PrefixTrie
from pie.runtime.quotas import page_share
from pie.runtime.scheduler import Scheduler
from pie.runtime.snapshots import SnapshotStore
from pie.runtime.state_slots import StateSlots

if TYPE_CHECKING:
    from pie.engine.batch import Sampler
    from pie.runtime.runtime import RuntimeLimits
    from pie.runtime.tokenizer import ModelTokenizer

# Engine facts every group of a model must share: contexts are checked against them model-wide.
SHARED_FACTS = ("model_type", "page_size", "vocab_size", "max_batch_tokens", "max_dist_size", "max_num_embeds")


class EngineGroup:
    """One data-parallel group: an engine client and everything that manages that engine's KV pages."""

    def __init__(self, index: int, engine: EngineClient, limits: RuntimeLimits, *, owns_engine: bool) -> None:
        info: Any = engine.info
        self.index = index
        self.engine = engine
        self.owns_engine = owns_engine  # close the engine with the runtime
        self.info = info
        self.pool = PagePool(info.num_pages)
        self.trie = PrefixTrie(self.pool)
        self.space = ContextSpace(self.pool, self.trie, info.page_size)
        num_state_slots = int(getattr(info, "num_state_slots", 0))  # a hybrid model: one per context
        if num_state_slots:
            self.space.states = StateSlots(num_state_slots)
        self.scheduler = Scheduler(engine, self.space, max_batch_tokens=info.max_batch_tokens,
                                   max_batch_size=info.max_batch_size,
                                   page_wait_timeout_s=limits.page_wait_timeout_s,
                                   max_prefill_tokens=limits.max_prefill_tokens_per_step)

    def load(self) -> tuple[int, int]:
        """How busy the group is, for placing a new context: lower is less loaded.

        First KV pages in use plus pending passes: pages are what a group runs
        out of (a full pool suspends contexts), pending passes are the compute
        queue the new context would join. Then live contexts: a context holds no
        page until its first pass is batched, so inferlets launched together
        would all see empty pools; counting their contexts spreads them."""
        return self.pool.num_used + self.scheduler.num_pending, len(self.space.live)


class ModelRuntime:
    """A served model (what inferlets name in `Model.load`): one or more `EngineGroup`s."""

    def __init__(self, name: str, engines: EngineClient | Sequence[EngineClient], limits: RuntimeLimits, *,
                 owns_engine: bool = True, adapter_dir: Path | None = None) -> None:
        clients = tuple(engines) if isinstance(engines, Sequence) else (engines,)
        assert clients, f"model {name!r} needs at least one engine"
        _check_engines_agree(name, clients)
        self.name = name
        self.groups = tuple(EngineGroup(i, e, limits, owns_engine=owns_engine) for i, e in enumerate(clients))
        info: Any = self.groups[0].info
        self.info = info
        self.page_size: int = info.page_size
        self.vocab_size: int = info.vocab_size
        self.max_batch_tokens: int = info.max_batch_tokens
        self.max_dist_size: int = info.max_dist_size
        self.max_num_embeds: int = info.max_num_embeds
        # What one instance may hold on one group (the per-instance limits): a context can grow no further.
        pool = min(g.pool.num_pages for g in self.groups)
        self.max_pages_per_instance: int = min(pool, page_share(pool, limits.max_page_share_per_instance),
                                               limits.max_pages_per_instance or pool)
        # Samplers read from passes (`pie.runtime.forward_pass.PassReader`), shared by every instance of the
        # model: decode loops repeat theirs, and a Sampler is immutable.
        self.samplers: dict[tuple[Any, ...], Sampler] = {}
        self.snapshots = SnapshotStore(name)
        # LoRA adapters by (user, name), on every group's engine (a context on any group may use one).
        self.adapters = AdapterStore([g.engine for g in self.groups], adapter_dir or pie_home() / "adapters",
                                     name)

    # -- where contexts live --------------------------------------------------------------------

    def place(self) -> EngineGroup:
        """The group a new context goes to: the least loaded (`EngineGroup.load`), the first on a tie."""
        groups = self.groups
        if len(groups) == 1:
            return groups[0]
        return min(groups, key=EngineGroup.load)

    def group_of(self, ctx: Context) -> EngineGroup:
        """The group holding `ctx`'s pages (the one whose context space made it)."""
        for group in self.groups:
            if ctx.space is group.space:
                return group
        raise AssertionError(f"context {ctx.id} belongs to no group of model {self.name!r}")

    # -- the only group of a model without data parallelism (tests and benchmarks reach in here) --

    @property
    def pool(self) -> PagePool:
        return self._only().pool

    @property
    def trie(self) -> PrefixTrie:
        return self._only().trie

    @property
    def space(self) -> ContextSpace:
        return self._only().space

    @property
    def scheduler(self) -> Scheduler:
        return self._only().scheduler

    def _only(self) -> EngineGroup:
        assert len(self.groups) == 1, f"model {self.name!r} has {len(self.groups)} groups; pick one in .groups"
        return self.groups[0]

    # -- facts and status -----------------------------------------------------------------------

    @cached_property
    def tokenizer(self) -> ModelTokenizer:
        from pie.runtime.tokenizer import ModelTokenizer

        return ModelTokenizer(self.info.model_dir)

    def describe(self) -> dict[str, Any]:
        """`Host.model_info`: the tokenizer's facts plus the engine's (vocab_size = logits length).

        `num_pages` is the smallest group's pool: a context lives on one group, so that is what one
        context can grow to. A checkpoint without a tokenizer (benchmarks' dummy models) still
        describes its engine; tokenizer calls on it fail with the reason."""
        try:
            facts = dict(self.tokenizer.info())
        except ModelNotFoundError:
            facts = {"stop_tokens": [], "chat_template": False}
        facts["tokenizer_vocab_size"] = facts.get("vocab_size")
        return facts | {
            "name": self.name, "model_type": self.info.model_type, "page_size": self.page_size,
            "vocab_size": self.vocab_size, "num_pages": min(g.pool.num_pages for g in self.groups),
            "max_batch_tokens": self.max_batch_tokens, "max_dist_size": self.max_dist_size,
            "max_num_embeds": self.max_num_embeds, "system_speculation": False,
            "max_pages_per_instance": self.max_pages_per_instance,
            # Hybrid models: no run-ahead streams (a stream's stop cuts the record back, which a recurrent state
            # cannot undo without recomputing the whole context); the SDK then runs its step-by-step loop.
            "run_ahead": not getattr(self.info, "num_state_slots", 0),
            "state_bytes_per_context": int(getattr(self.info, "state_bytes_per_slot", 0)),
        }

    def status(self) -> ModelStatus:
        """Pages and tokens summed over the groups; the slowest group's latest batch; every device."""
        groups = self.groups
        stats = [g.scheduler.stats for g in groups]
        devices = ",".join(str(g.info.device) for g in groups)
        return ModelStatus(self.name, self.info.model_type, devices, sum(g.pool.num_pages for g in groups),
                           sum(g.pool.num_used for g in groups), sum(s.tokens_processed for s in stats),
                           sum(s.batches for s in stats), max(s.last_batch_ms for s in stats))

    def check_integrity(self) -> None:
        for group in self.groups:
            group.space.check_integrity()

    async def close(self) -> None:
        """Fail pending passes, drop the snapshots, then stop the engines the runtime started."""
        for group in self.groups:
            await group.scheduler.close()
        self.snapshots.clear()
        for group in self.groups:
            if group.owns_engine:
                await group.engine.close()


def _check_engines_agree(name: str, engines: Sequence[EngineClient]) -> None:
    first: Any = engines[0].info
    for index, engine in enumerate(engines[1:], 1):
        info: Any = engine.info
        for fact in SHARED_FACTS:
            if getattr(info, fact) != getattr(first, fact):
                raise ConfigError(f"model {name!r}: data-parallel group {index} has {fact} = "
                                  f"{getattr(info, fact)!r}, group 0 has {getattr(first, fact)!r}; every group "
                                  "must run the same checkpoint with the same engine options")
