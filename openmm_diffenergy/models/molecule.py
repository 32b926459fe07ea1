"""A chirality-aware invariant energy network for small molecules.

Features of a configuration ``y`` (model coordinates, shape (B, 3N)):

- all pairwise distances ``d_ij = sqrt(|y_i - y_j|^2 + eps^2)`` (rotation, translation and
  reflection invariant);
- ``cos`` and ``sin`` of chosen torsions (i, j, k, l). ``sin`` changes sign under a mirror
  image, so the network tells L- from D-alanine and the sign of phi; all features are
  smooth (regularized near collinear atoms).

An MLP with SiLU activations maps the features and Fourier features of ``t`` to a
correction, divided by ``c(t) = sqrt(sigma(t)^2 + 0.01^2)`` (so that the network's output
stays of order one while the score grows like ``1/sigma`` at small ``t``), and added to a
Gaussian baseline ``|y_c|^2 / (2 v(t))``, ``v = alpha^2 + sigma^2``, the exact energy of
unit-variance data at ``t = 1``, which keeps the learned energy confining at every ``t``.
An optional :class:`~openmm_diffenergy.models.prior.FeaturePrior` (a harmonic energy on
bond and 1-3 distances and on the signed volumes around branching atoms, with statistics
measured on the diffused training data) holds the stiff coordinates and the chirality.
"""
from __future__ import annotations

import math

import torch

from ..io import register_model
from ..sde import VPSDE, sde_from_config
from .base import EnergyModel
from .prior import FeaturePrior

__all__ = ["MoleculeEnergy", "torsion_quadruples"]


def torsion_quadruples(bonds, n_atoms: int) -> list:
    """All proper torsions (i, j, k, l) of a bond graph, each once.

    Parameters
    ----------
    bonds : iterable of (int, int)
    n_atoms : int
    """
    nbr = [set() for _ in range(n_atoms)]
    for a, b in bonds:
        nbr[a].add(b)
        nbr[b].add(a)
    out = []
    for j in range(n_atoms):
        for k in nbr[j]:
            if k <= j:
                continue
            for i in sorted(nbr[j] - {k}):
                for l_ in sorted(nbr[k] - {j, i}):
                    out.append((i, j, k, l_))
    return out


def _torsion_cos_sin(p: torch.Tensor, quads: torch.Tensor, eps: float, soft: float = 0.0):
    """cos and sin of torsions, shape (B, Q) each, for positions p (B, N, 3).

    With ``soft > 0`` both are damped to zero where the torsion is ill-defined
    (``r = |n1||n2| -> 0``): ``(x, y) / sqrt(r^2 + soft^2)``, bounded gradients everywhere.
    """
    a, b, c, d = (p[:, quads[:, m]] for m in range(4))
    b1, b2, b3 = b - a, c - b, d - c
    n1 = torch.cross(b1, b2, dim=-1)
    n2 = torch.cross(b2, b3, dim=-1)
    b2n = b2 / torch.sqrt((b2 * b2).sum(-1, keepdim=True) + eps ** 2)
    m1 = torch.cross(n1, b2n, dim=-1)
    x = (n1 * n2).sum(-1)
    y = (m1 * n2).sum(-1)
    r = torch.sqrt(x * x + y * y + eps ** 4 + soft ** 2)
    return x / r, y / r


@register_model
class MoleculeEnergy(EnergyModel):
    """Invariant, chirality-aware, time-conditioned energy network.

    Parameters
    ----------
    n_particles : int
    torsions : sequence of (int, int, int, int)
        Atom quadruples whose torsion cos/sin are features (may be empty).
    hidden, layers : int
        MLP width and depth.
    n_frequencies : int
        Fourier features ``sin/cos(2 pi k t)`` besides ``t``.
    length_scale : float
        nm.
    t_min : float
    sde : LinearSDE, optional
    seed : int, optional
    output_scale : {"sigma", "none"}
        Divide the network's output by ``c(t) = sqrt(sigma(t)^2 + sigma_out^2)``
        (default) or not.
    sigma_out : float
        The floor of ``c(t)`` (model units). Below it the network's energy scale is
        nearly constant in t; the default 0.01 is what the shipped models use.
    log_sigma_feature : bool
        Add ``log(sigma(t)) / 4`` to the time features. ``t`` and its Fourier features
        hardly change over ``t < 0.01``, where ``sigma`` changes tenfold; this feature
        resolves the small times.
    torsion_soft : float
        Damping of torsion features where atoms are near collinear or overlap (model
        units^4); 0 gives plain cos/sin, whose gradients blow up there.
    prior : dict, optional
        A :class:`~openmm_diffenergy.models.prior.FeaturePrior` as its ``config()``
        (pairs, centres and the diffused feature statistics, usually from
        ``FeaturePrior.fit`` on the training data), added to the energy. Its signed
        volumes are also inputs of the network: a direct, nearly linear chirality signal
        that survives noise better than torsion sines do.
    net_t_floor : float
        The network sees ``max(t, net_t_floor)`` (features and output scale); below it
        only the Gaussian term and the prior, whose diffused statistics are exact, carry
        the time dependence. Denoising score matching barely constrains the soft
        coordinates (torsions) at the smallest t, where its targets are noise of size
        ``1 / sigma``; with a floor (0.02 for the shipped all-atom model) the torsion
        landscape at ``t_min`` is the one the network learned at the floor, at the cost
        of the network's own time dependence below it. 0 (default) disables it.
    """

    def __init__(self, n_particles: int, torsions=(), hidden: int = 128, layers: int = 3,
                 n_frequencies: int = 6, length_scale: float = 1.0, t_min: float = 1e-3,
                 sde=None, seed: int | None = None, output_scale: str = "sigma",
                 torsion_soft: float = 0.1, prior: dict | None = None,
                 net_t_floor: float = 0.0, sigma_out: float = 0.01,
                 log_sigma_feature: bool = False):
        super().__init__(3 * n_particles, n_particles, length_scale=length_scale, t_min=t_min)
        self.sde = sde if sde is not None else VPSDE()
        torsions = [tuple(int(a) for a in q) for q in torsions]
        for q in torsions:
            if len(q) != 4 or min(q) < 0 or max(q) >= n_particles or len(set(q)) != 4:
                raise ValueError(f"bad torsion {q} for {n_particles} particles")
        self._config = {"n_particles": n_particles, "torsions": torsions, "hidden": hidden,
                        "layers": layers, "n_frequencies": n_frequencies,
                        "length_scale": self.length_scale, "t_min": self.t_min,
                        "sde": self.sde.config(), "output_scale": output_scale,
                        "torsion_soft": float(torsion_soft), "prior": prior,
                        "net_t_floor": float(net_t_floor), "sigma_out": float(sigma_out),
                        "log_sigma_feature": bool(log_sigma_feature)}
        if not sigma_out > 0:
            raise ValueError(f"sigma_out must be positive, got {sigma_out}")
        self.sigma_out = float(sigma_out)
        self.log_sigma_feature = bool(log_sigma_feature)
        if not 0.0 <= net_t_floor < 1.0:
            raise ValueError(f"net_t_floor must lie in [0, 1), got {net_t_floor}")
        self.net_t_floor = float(net_t_floor)
        self.torsion_soft = float(torsion_soft)
        if output_scale not in ("sigma", "none"):
            raise ValueError(f"output_scale must be 'sigma' or 'none', got {output_scale!r}")
        self._scale_output = output_scale == "sigma"
        i, j = torch.triu_indices(n_particles, n_particles, offset=1)
        self.register_buffer("pair_i", i)
        self.register_buffer("pair_j", j)
        self.register_buffer("quads", torch.tensor(torsions, dtype=torch.int64).reshape(-1, 4))
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(
            1, n_frequencies + 1, dtype=torch.float32))
        n_volumes = 0 if prior is None else len(prior["centres"])
        n_in = (i.shape[0] + 2 * len(torsions) + n_volumes + 1 + 2 * n_frequencies
                + int(self.log_sigma_feature))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        dims = [n_in] + [hidden] * layers + [1]
        self.linears = torch.nn.ModuleList()
        for a, b in zip(dims[:-1], dims[1:]):
            lin = torch.nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(b, a, generator=gen) / math.sqrt(a))
                lin.bias.zero_()
            self.linears.append(lin)
        with torch.no_grad():
            self.linears[-1].weight.mul_(0.1)
        self.eps = 1e-3
        self._has_torsions = len(torsions) > 0   # a Python bool: tracing keeps it constant
        self.prior = None if prior is None else FeaturePrior(n_particles, sde=self.sde, **prior)
        self._has_prior = prior is not None
        self._has_volumes = n_volumes > 0

    def config(self) -> dict:
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "MoleculeEnergy":
        config = dict(config)
        config["sde"] = sde_from_config(config["sde"])
        config.setdefault("output_scale", "none")   # files written before the options
        config.setdefault("torsion_soft", 0.0)
        config.setdefault("net_t_floor", 0.0)
        config.setdefault("sigma_out", 0.01)
        config.setdefault("log_sigma_feature", False)
        return cls(**config)

    def features(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network input, shape (B, n_features)."""
        p = y.to(self.frequencies.dtype).reshape(y.shape[0], -1, 3)
        d = p[:, self.pair_i] - p[:, self.pair_j]
        feats = [torch.sqrt((d * d).sum(-1) + self.eps ** 2)]
        if self._has_torsions:
            feats.extend(_torsion_cos_sin(p, self.quads, self.eps, self.torsion_soft))
        if self._has_volumes:
            feats.append(self.prior.volumes(p))
        feats.append(self.time_features(t.to(p.dtype)))
        return torch.cat(feats, dim=-1)

    def time_features(self, tn: torch.Tensor) -> torch.Tensor:
        """Network inputs of the (floored) time ``tn`` (B,), shape (B, n_time)."""
        tt = tn[:, None]
        feats = [tt, torch.sin(tt * self.frequencies), torch.cos(tt * self.frequencies)]
        if self.log_sigma_feature:
            feats.append(0.125 * torch.log(self.sde.sigma2(tt) + 1e-12))
        return torch.cat(feats, dim=-1)

    def output_denominator(self, tn: torch.Tensor) -> torch.Tensor:
        """``c(tn) = sqrt(sigma(tn)^2 + sigma_out^2)``, shape of ``tn``."""
        return torch.sqrt(self.sde.sigma2(tn) + self.sigma_out ** 2)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees, ``max(t, net_t_floor)`` (shape of ``t``)."""
        return torch.clamp(t, min=self.net_t_floor)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Energy in kT of model coordinates ``y`` (B, 3N) at times ``t`` (B,)."""
        tn = self.network_time(t)
        h = self.features(y, tn)
        for lin in self.linears[:-1]:
            h = torch.nn.functional.silu(lin(h))
        p = y.to(h.dtype).reshape(y.shape[0], -1, 3)
        yc = p - p.mean(dim=1, keepdim=True)
        tt = t.to(h.dtype)
        s2 = self.sde.sigma2(tt)
        v = self.sde.alpha(tt) ** 2 + s2
        out = self.linears[-1](h)[:, 0]
        if self._scale_output:
            out = out / self.output_denominator(tn.to(h.dtype))
        out = out + 0.5 * (yc * yc).sum((1, 2)) / v
        if self._has_prior:
            out = out + self.prior(y, t).to(out.dtype)
        return out
