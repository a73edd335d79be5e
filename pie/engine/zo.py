"""Zeroth-order training of a LoRA adapter: seeded Gaussian perturbations and the evolution-strategy update.

An adapter's parameters theta are its PEFT tensors (every lora_A and lora_B, by file key). A pass with
`Request.zo_seed = s` runs the adapter theta + sigma * eps(s), where eps(s) is a standard Gaussian over
theta drawn on the engine's device from `torch.Generator` seeded with s (`perturbation`): the same seed
gives the same eps on every run and in every batch, whatever else the batch holds.

`ZoState.update(theta, scores, seeds, max_sigma)` is one generation of an isotropic (mu/mu_w, lambda)
evolution strategy, i.e. CMA-ES without the covariance matrix:

    rank the seeds by score (higher is better) and keep the best mu = round(mu_fraction * population_size);
    theta += sigma * sum_i w_i * eps(seed_i),   w_i proportional to ln(mu + 1/2) - ln(i), summing to 1;
    sigma  = min(max_sigma, sigma * exp(c_s / d_s * (|p| / E|N(0, I)| - 1)))   (cumulative step-size
             adaptation over the evolution path p, with CMA-ES's default c_s and d_s for n = |theta|)

So the adapter moves by a weighted sum of the winners' perturbations, scaled by sigma: the ES gradient
estimate with the rewards replaced by rank weights (robust to the scale and offset of the reward).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pie.errors import AdapterError

_SEED_MOD = 1 << 64


def perturbation(shapes: Mapping[str, torch.Size], seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """eps(seed): one float32 standard Gaussian per parameter tensor, drawn in sorted key order from a
    generator seeded with `seed` (any integer, taken mod 2**64) on `device`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % _SEED_MOD)
    return {k: torch.randn(shapes[k], generator=gen, device=device, dtype=torch.float32) for k in sorted(shapes)}


def recombination_weights(mu: int) -> list[float]:
    """CMA-ES's default positive weights for the best `mu` of a population: ln(mu + 1/2) - ln(i), normalised."""
    raw = [math.log(mu + 0.5) - math.log(i) for i in range(1, mu + 1)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class ZoState:
    """The evolution strategy of one adapter (set by `zo.initialize`, advanced by `zo.update`)."""

    population_size: int
    mu: int
    sigma: float
    weights: list[float]
    generation: int = 0
    path: dict[str, torch.Tensor] = field(default_factory=dict)  # CSA evolution path, zero until the first update

    @staticmethod
    def create(population_size: int, mu_fraction: float, initial_sigma: float) -> ZoState:
        if type(population_size) is not int or population_size < 1:
            raise AdapterError(f"zo population_size must be an integer >= 1, got {population_size!r}")
        if not (isinstance(mu_fraction, int | float) and 0.0 < mu_fraction <= 1.0):
            raise AdapterError(f"zo mu_fraction must be in (0, 1] (the share of seeds an update recombines), "
                               f"got {mu_fraction!r}")
        _check_sigma("initial_sigma", initial_sigma)
        mu = min(population_size, max(1, round(mu_fraction * population_size)))
        return ZoState(population_size, mu, float(initial_sigma), recombination_weights(mu))

    def clone(self) -> ZoState:
        return ZoState(self.population_size, self.mu, self.sigma, list(self.weights), self.generation,
                       {k: t.clone() for k, t in self.path.items()})

    @property
    def mu_eff(self) -> float:
        return 1.0 / sum(w * w for w in self.weights)

    def update(self, theta: dict[str, torch.Tensor], scores: Sequence[float], seeds: Sequence[int],
               max_sigma: float) -> None:
        """One generation, in place on `theta` (float32 tensors on the engine device); see the module doc.
        Raises AdapterError, before changing anything, for mismatched or too few scores."""
        if len(scores) != len(seeds):
            raise AdapterError(f"zo.update got {len(scores)} scores for {len(seeds)} seeds; give one score per seed")
        if len(seeds) < self.mu:
            raise AdapterError(f"zo.update got {len(seeds)} scored seeds, fewer than the mu = {self.mu} it "
                               f"recombines (population_size {self.population_size} x mu_fraction); score at "
                               "least that many perturbations, or initialize with a smaller population")
        values = [float(s) for s in scores]
        if not all(math.isfinite(v) for v in values):
            raise AdapterError("zo.update scores must be finite numbers (a NaN or inf score cannot be ranked)")
        if not all(type(s) is int for s in seeds):
            raise AdapterError("zo.update seeds must be integers (the zo_seed each scored pass ran with)")
        _check_sigma("max_sigma", max_sigma)
        best = sorted(range(len(values)), key=lambda i: -values[i])[:self.mu]  # stable: ties keep their order
        shapes = {k: t.shape for k, t in theta.items()}
        device = next(iter(theta.values())).device
        step = {k: torch.zeros_like(t) for k, t in theta.items()}
        for w, i in zip(self.weights, best, strict=True):
            for k, e in perturbation(shapes, seeds[i], device).items():
                step[k].add_(e, alpha=w)
        for k, t in theta.items():
            t.add_(step[k], alpha=self.sigma)
        self.sigma = min(float(max_sigma), self._adapted_sigma(step))
        self.generation += 1

    def _adapted_sigma(self, step: dict[str, torch.Tensor]) -> float:
        """Cumulative step-size adaptation: sigma grows when successive steps line up, shrinks when they
        cancel (the weighted mean of mu Gaussians, times sqrt(mu_eff), is a standard Gaussian)."""
        n = sum(t.numel() for t in step.values())
        mu_eff = self.mu_eff
        c_s = (mu_eff + 2.0) / (n + mu_eff + 5.0)
        d_s = 1.0 + 2.0 * max(0.0, math.sqrt((mu_eff - 1.0) / (n + 1.0)) - 1.0) + c_s
        gain = math.sqrt(c_s * (2.0 - c_s) * mu_eff)
        norm_sq = 0.0
        for k, s in step.items():
            p = self.path.get(k)
            p = s.mul(gain) if p is None else p.mul_(1.0 - c_s).add_(s, alpha=gain)
            self.path[k] = p
            norm_sq += float(p.double().square().sum())
        chi_n = math.sqrt(n) * (1.0 - 1.0 / (4.0 * n) + 1.0 / (21.0 * n * n))
        return self.sigma * math.exp(c_s / d_s * (math.sqrt(norm_sq) / chi_n - 1.0))


def _check_sigma(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise AdapterError(f"zo {name} must be a finite number > 0 (the perturbation's standard deviation), "
                           f"got {value!r}")
