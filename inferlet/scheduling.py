"""Pie's market view of the scheduler (`inferlet.scheduling`), mapped onto pie's priorities.

pie has no market: contexts run and are suspended by priority (`ctx.set_bid(value)`, Pie's bid, is the
priority; higher runs first and is suspended last), then by age. The numbers Pie's functions return are
read here from the same state, in the same units, so a program written against them keeps working:

- `price()`: credits per new KV page. Always 1.0, as Pie's price is one credit per page; here it never
  moves, because nothing is auctioned.
- `balance(model)`: credits this instance may still spend on the model, i.e. the KV pages it may still
  take before its per-instance page limit (`[runtime] max_pages_per_instance`, or its share of the
  pool) refuses more.
- `rent(ctx)`: what the context costs per step: the pages it holds, times `price()`.
- `dividend(model)`: 0.0. Pie pays idle contexts a dividend from others' bids; with no bids paid
  here, there is none.
- `latency(ctx)`: seconds the last engine batch took on the context's scheduler (the step time the
  context currently sees).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferlet._host import get_host

if TYPE_CHECKING:
    from inferlet.context import Context
    from inferlet.model import Model

PAGE_PRICE = 1.0


def price() -> float:
    return PAGE_PRICE


def balance(model: Model) -> float:
    info = get_host().scheduling(model.name, 0)
    return max(info["page_limit"] - info["pages_held"], 0.0) * PAGE_PRICE


def rent(ctx: Context) -> float:
    return get_host().scheduling(ctx.model.name, ctx._handle)["ctx_pages"] * PAGE_PRICE


def dividend(model: Model) -> float:
    return 0.0


def latency(ctx: Context) -> float:
    return get_host().scheduling(ctx.model.name, ctx._handle)["latency_s"]
