"""A small invariant energy network: pairwise distances and time into an MLP.

``E(y, t) = MLP([d_ij(y) / d0, time features(t)])``. Distances make it invariant to
rotation and translation; SiLU activations and ``d_ij = sqrt(|y_i - y_j|^2 + eps^2)``
make it smooth, so forces and Laplacians can be taken through it. Distances alone do
not see chirality (a mirror image has the same energy).
"""
from __future__ import annotations

import math

import torch

from ..io import register_model
from ..sde import VPSDE, sde_from_config
from .base import EnergyModel

__all__ = ["DistanceMLPEnergy"]


@register_model
class DistanceMLPEnergy(EnergyModel):
    """Energy network on all pairwise distances, conditioned on diffusion time.

    Parameters
    ----------
    n_particles : int
    hidden : int
        Width of the hidden layers.
    layers : int
        Number of hidden layers.
    n_frequencies : int
        Fourier features of ``t`` (sin and cos of ``2 pi k t``, k = 1..n) besides ``t``.
    length_scale : float
        nm; the network sees ``x / length_scale``.
    t_min : float
    sde : LinearSDE, optional
        Carried for likelihoods and saved with the model; ``VPSDE()`` by default.
    dtype : torch.dtype
    seed : int, optional
        Seed of the weight initialization.
    """

    def __init__(self, n_particles: int, hidden: int = 64, layers: int = 2,
                 n_frequencies: int = 4, length_scale: float = 1.0, t_min: float = 1e-3,
                 sde=None, dtype=torch.float32, seed: int | None = None):
        super().__init__(3 * n_particles, n_particles, length_scale=length_scale, t_min=t_min)
        if n_particles < 2:
            raise ValueError("DistanceMLPEnergy needs at least 2 particles")
        self.sde = sde if sde is not None else VPSDE()
        self._config = {"n_particles": n_particles, "hidden": hidden, "layers": layers,
                        "n_frequencies": n_frequencies, "length_scale": self.length_scale,
                        "t_min": self.t_min, "sde": self.sde.config(),
                        "dtype": str(dtype).replace("torch.", "")}
        i, j = torch.triu_indices(n_particles, n_particles, offset=1)
        self.register_buffer("pair_i", i)
        self.register_buffer("pair_j", j)
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(
            1, n_frequencies + 1, dtype=dtype))
        n_in = i.shape[0] + 1 + 2 * n_frequencies
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        dims = [n_in] + [hidden] * layers + [1]
        self.linears = torch.nn.ModuleList()
        for a, b in zip(dims[:-1], dims[1:]):
            lin = torch.nn.Linear(a, b, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=dtype) / math.sqrt(a))
                lin.bias.zero_()
            self.linears.append(lin)
        self.eps = 1e-3

    def config(self) -> dict:
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "DistanceMLPEnergy":
        config = dict(config)
        config["sde"] = sde_from_config(config["sde"])
        config["dtype"] = getattr(torch, config["dtype"])
        return cls(**config)

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """Network inputs of the time ``t`` (B,): ``t`` and its Fourier features, (B, 1 + 2K)."""
        tt = t[:, None]
        return torch.cat([tt, torch.sin(tt * self.frequencies),
                          torch.cos(tt * self.frequencies)], dim=-1)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Energy in kT of model coordinates ``y`` (B, 3N) at times ``t`` (B,)."""
        dt = self.frequencies.dtype
        p = y.to(dt).reshape(y.shape[0], -1, 3)
        d = p[:, self.pair_i] - p[:, self.pair_j]
        dist = torch.sqrt((d * d).sum(-1) + self.eps ** 2)
        h = torch.cat([dist, self.time_features(t.to(dt))], dim=-1)
        for lin in self.linears[:-1]:
            h = torch.nn.functional.silu(lin(h))
        return self.linears[-1](h)[:, 0]
