"""Noise schedules: variance-preserving (VP) and variance-exploding (VE) SDEs.

Both are linear SDEs ``dx = a(t) x dt + g(t) dW`` on the model's (dimensionless)
coordinates, whose marginals given ``x_0`` are ``N(alpha(t) x_0, sigma(t)^2 I)``.
Everything follows from ``alpha(t)`` and ``sigma(t)^2``::

    a(t)   = d log alpha / dt
    g(t)^2 = d sigma^2 / dt - 2 a(t) sigma(t)^2

Positions are centred and divided by the model's length scale ``s`` (nm) before they
diffuse, so the SDEs here never see nm (see :mod:`openmm_diffenergy.likelihood`).
"""
from __future__ import annotations

import math

import torch

from .coordinates import centre, subspace_noise

__all__ = ["LinearSDE", "VPSDE", "VESDE"]


class LinearSDE:
    """Base class of the linear noise schedules; ``T = 1``.

    Subclasses define :meth:`alpha`, :meth:`sigma2`, :meth:`drift_coeff` and :meth:`g2`
    as functions of a tensor of times (any shape, values in [0, 1]).
    """

    T = 1.0

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Mean coefficient ``alpha(t)``: ``E[x_t | x_0] = alpha(t) x_0``."""
        raise NotImplementedError

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        """Marginal variance ``sigma(t)^2`` of ``x_t | x_0`` per coordinate."""
        raise NotImplementedError

    def drift_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """``a(t)`` in the drift ``f(x, t) = a(t) x``."""
        raise NotImplementedError

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        """Squared diffusion coefficient ``g(t)^2``."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Marginal standard deviation ``sigma(t)``."""
        return self.sigma2(t).sqrt()

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """Diffusion coefficient ``g(t)``."""
        return self.g2(t).sqrt()

    def drift(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Drift ``f(y, t) = a(t) y`` for ``y`` of shape (B, dim) and ``t`` of shape (B,)."""
        return self.drift_coeff(t)[:, None] * y

    @property
    def prior_variance(self) -> float:
        """Variance per coordinate of the prior ``p_T``: ``alpha(T)^2 + sigma(T)^2``.

        This is the exact marginal at ``T`` of data with zero mean and unit variance, the
        usual state of data divided by their length scale.
        """
        t = torch.tensor(self.T, dtype=torch.float64)
        return float(self.alpha(t) ** 2 + self.sigma2(t))

    def prior_log_prob(self, y: torch.Tensor, dof: int, n_particles: int | None = None):
        """Log density of the Gaussian prior on the model's space.

        Parameters
        ----------
        y : torch.Tensor, shape (B, dim)
            Model coordinates at ``t = T``.
        dof : int
            Degrees of freedom ``D`` (``3(N - 1)`` for particle systems).
        n_particles : int or None
            For particle systems the centroid is removed before the norm is taken.

        Returns
        -------
        torch.Tensor, shape (B,), in nats.
        """
        v = self.prior_variance
        y = centre(y, n_particles)
        return -0.5 * (y * y).sum(-1) / v - 0.5 * dof * math.log(2 * math.pi * v)

    def prior_sample(self, n: int, dim: int, n_particles: int | None = None, generator=None,
                     dtype=torch.float64) -> torch.Tensor:
        """``n`` draws from the prior, shape (n, dim), centred for particle systems."""
        eps = subspace_noise((n, dim), n_particles, generator=generator, dtype=dtype)
        return math.sqrt(self.prior_variance) * eps

    def marginal_sample(self, y0: torch.Tensor, t: torch.Tensor, n_particles: int | None = None,
                        generator=None) -> torch.Tensor:
        """Draw ``y_t ~ N(alpha(t) y0, sigma(t)^2)`` on the model's space.

        Parameters
        ----------
        y0 : torch.Tensor, shape (B, dim)
        t : torch.Tensor, shape (B,)
        """
        eps = subspace_noise(y0.shape, n_particles, generator=generator, dtype=y0.dtype,
                             device=y0.device)
        return self.alpha(t)[:, None] * y0 + self.sigma(t)[:, None] * eps

    def transition_sample(self, y: torch.Tensor, s: float, t: float,
                          n_particles: int | None = None, generator=None) -> torch.Tensor:
        """Exact forward transition ``y_t | y_s`` for ``s < t`` (a Gaussian for linear SDEs)."""
        ts = torch.tensor([s, t], dtype=torch.float64)
        a = self.alpha(ts)
        v = self.sigma2(ts)
        ratio = float(a[1] / a[0])
        var = max(float(v[1] - ratio ** 2 * v[0]), 0.0)
        eps = subspace_noise(y.shape, n_particles, generator=generator, dtype=y.dtype,
                             device=y.device)
        return ratio * y + math.sqrt(var) * eps


class VPSDE(LinearSDE):
    """Variance-preserving SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW``.

    ``beta(t) = beta_min + t (beta_max - beta_min)``, ``alpha(t) = exp(-1/2 int_0^t beta)``,
    ``sigma(t)^2 = 1 - alpha(t)^2``.

    Parameters
    ----------
    beta_min, beta_max : float
        The linear schedule's end points (defaults of Song et al. 2021).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _int_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha(self, t):
        return torch.exp(-0.5 * self._int_beta(t))

    def sigma2(self, t):
        return -torch.expm1(-self._int_beta(t))

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def config(self) -> dict:
        return {"type": "VPSDE", "beta_min": self.beta_min, "beta_max": self.beta_max}

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VESDE(LinearSDE):
    """Variance-exploding SDE ``dx = sqrt(d sigma_v(t)^2 / dt) dW``.

    ``sigma_v(t) = sigma_min (sigma_max / sigma_min)^t``; started at ``t = 0``, the
    marginal variance is ``sigma(t)^2 = sigma_v(t)^2 - sigma_min^2`` (exactly zero at 0).

    Parameters
    ----------
    sigma_min, sigma_max : float
        Noise scale at ``t = 0`` and ``t = 1`` (model units).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _sigma_v2(self, t):
        return self.sigma_min ** 2 * torch.exp(2 * t * self._log_ratio)

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma2(self, t):
        return self.sigma_min ** 2 * torch.expm1(2 * t * self._log_ratio)

    def drift_coeff(self, t):
        return torch.zeros_like(t)

    def g2(self, t):
        return 2 * self._log_ratio * self._sigma_v2(t)

    def config(self) -> dict:
        return {"type": "VESDE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def sde_from_config(config: dict) -> LinearSDE:
    """Rebuild an SDE from :meth:`config` output (used by saved models)."""
    config = dict(config)
    kind = config.pop("type", None)
    classes = {"VPSDE": VPSDE, "VESDE": VESDE}
    if kind not in classes:
        raise ValueError(f"unknown SDE type {kind!r}; expected one of {sorted(classes)}")
    return classes[kind](**config)
