"""Zeroth-order training of a LoRA adapter by seeded perturbations (Pie's `inferlet.zo`).

    adapter = Adapter.create(model, "policy")
    zo.initialize(adapter, rank=4, alpha=8.0, population_size=8, mu_fraction=0.5, initial_sigma=0.01)
    for generation in range(steps):
        seeds = [generation * 1000 + i for i in range(8)]
        scores = [await rollout(ctx.fork(), adapter, s) for s in seeds]   # each pass: fwd.zo_seed(s)
        zo.update(adapter, scores, seeds, max_sigma=0.1)

A pass with `zo_seed(s)` runs the adapter as theta + sigma * eps(s): theta the adapter's LoRA A/B tensors,
eps(s) a standard Gaussian the engine draws on its device from a generator seeded with s (so a seed means
the same perturbation in every pass and batch, and `update` redraws it instead of shipping it). `update`
ranks the seeds by score (higher is better), keeps the best mu = round(mu_fraction * population_size),
and moves theta by sigma times their rank-weighted mean perturbation (CMA-ES's weights, no covariance);
sigma then adapts by cumulative step-size adaptation and is capped by `max_sigma`. docs/inferlets.md
("Zeroth-order training") has the details.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferlet._host import get_host
from inferlet.adapter import Adapter
from inferlet.forward import ZO_SEED_MOD, Forward


def adapter_seed(forward_pass: Forward, seed: int) -> None:
    """Run `forward_pass`'s adapter perturbed by `seed` (the same as `forward_pass.zo_seed(seed)`)."""
    forward_pass.zo_seed(seed)


def initialize(adapter: Adapter, rank: int, alpha: float, population_size: int, mu_fraction: float,
               initial_sigma: float) -> None:
    """Start evolving `adapter`. Without weights yet (a fresh `Adapter.create`), it becomes a rank-`rank`
    LoRA (scaling alpha / rank) on every attention and MLP projection that starts as the base model;
    with weights (`load`ed, or initialised before), it keeps them, and `rank` / `alpha` must be its own.
    `population_size` seeds are scored per generation, the best `mu_fraction` of them recombined;
    `initial_sigma` is the perturbations' standard deviation."""
    get_host().adapter_zo_initialize(adapter._handle, int(rank), float(alpha), int(population_size),
                                     float(mu_fraction), float(initial_sigma))


def update(adapter: Adapter, scores: Sequence[float], seeds: Sequence[int], max_sigma: float) -> None:
    """One generation: `scores[i]` is the reward of the passes run with `zo_seed(seeds[i])` (higher is
    better). The adapter moves by sigma times the weighted perturbations of the best seeds; then sigma
    adapts, at most `max_sigma`."""
    get_host().adapter_zo_update(adapter._handle, [float(s) for s in scores],
                                 [int(s) % ZO_SEED_MOD for s in seeds], float(max_sigma))
