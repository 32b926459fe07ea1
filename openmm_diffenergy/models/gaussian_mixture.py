"""Gaussian mixtures: energies whose diffused densities are known exactly at every t.

Under a linear SDE, ``x_t | x_0 ~ N(alpha x_0, sigma^2 I)``, so a mixture
``sum_k w_k N(mu_k, C_k)`` diffuses to ``sum_k w_k N(alpha mu_k, alpha^2 C_k + sigma^2 I)``.
:class:`GaussianMixtureEnergy` returns ``E(x, t) = -log p_t(x)`` exactly (normalized),
which makes it the oracle for every likelihood estimator in the package.
"""
from __future__ import annotations

import math

import torch

from ..coordinates import from_subspace, subspace_basis, to_subspace
from ..io import register_model
from ..sde import LinearSDE, VPSDE, sde_from_config
from .base import EnergyModel

__all__ = ["GaussianMixtureEnergy", "mixture_1d", "mixture_2d", "particle_mixture"]


@register_model
class GaussianMixtureEnergy(EnergyModel):
    """Exact diffused energy ``-log p_t`` of a Gaussian mixture, for vectors or particles.

    Parameters
    ----------
    means : array-like, shape (K, d) or (K, N, 3)
        Component means, in nm for particle systems. A 3-D array makes a particle model;
        its means are centred (the density lives on the centroid-free subspace).
    covariances : array-like, shape (K, d, d), (K, 3N, 3N), (K, d) or (K,)
        Full covariances (nm^2), or diagonal variances, or one isotropic variance per
        component. Particle covariances are projected on the centroid-free subspace,
        where they must be positive definite.
    weights : array-like, shape (K,), optional
        Positive mixture weights, normalized here. Equal weights by default.
    sde : LinearSDE, optional
        The noise schedule the mixture diffuses under; ``VPSDE()`` by default.
    length_scale : float
        Length scale ``s`` (nm): the diffusion acts on ``x / s``.

    Notes
    -----
    ``energy(x, t)`` is ``-log p~_t(x / s)``, the negative log density of the model
    coordinates. The density of positions (per nm^D) is given by :meth:`log_prob`.
    """

    def __init__(self, means, covariances, weights=None, sde: LinearSDE | None = None,
                 length_scale: float = 1.0):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() == 3:
            if means.shape[2] != 3:
                raise ValueError(f"particle means must have shape (K, N, 3), got "
                                 f"{tuple(means.shape)}")
            n_particles = means.shape[1]
            if n_particles < 2:
                raise ValueError("a particle mixture needs at least 2 particles")
            dim = 3 * n_particles
        elif means.dim() == 2:
            n_particles, dim = None, means.shape[1]
        else:
            raise ValueError(f"means must have shape (K, d) or (K, N, 3), got "
                             f"{tuple(means.shape)}")
        super().__init__(dim, n_particles, length_scale=length_scale)
        k = means.shape[0]
        if k < 1:
            raise ValueError("means must hold at least one component")
        if not torch.isfinite(means).all():
            raise ValueError("means hold NaN or inf values")
        self.sde = sde if sde is not None else VPSDE()
        s = self.length_scale

        cov = torch.as_tensor(covariances, dtype=torch.float64)
        if cov.shape == (k,):
            cov = cov[:, None, None] * torch.eye(dim, dtype=torch.float64)
        elif cov.shape == (k, dim):
            cov = torch.diag_embed(cov)
        elif cov.shape != (k, dim, dim):
            raise ValueError(f"covariances must have shape ({k}, {dim}, {dim}), ({k}, {dim}) "
                             f"or ({k},), got {tuple(cov.shape)}")
        if not torch.isfinite(cov).all():
            raise ValueError("covariances hold NaN or inf values")
        if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-12, rtol=1e-10):
            raise ValueError("covariances must be symmetric")

        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not torch.isfinite(weights).all() or (weights <= 0).any():
            raise ValueError(f"weights must be {k} positive finite numbers, got {weights}")
        weights = weights / weights.sum()
        self._config = {"means": means.tolist(), "covariances": cov.tolist(),
                        "weights": weights.tolist(), "sde": self.sde.config(),
                        "length_scale": self.length_scale}

        m = means.reshape(k, dim) / s
        c = cov / s ** 2
        if n_particles is not None:
            h = subspace_basis(n_particles)
            self.register_buffer("basis", h)
            q = torch.kron(h, torch.eye(3, dtype=torch.float64))  # (3N, D)
            m = to_subspace(m, h)
            c = q.T @ c @ q
        lam, u = torch.linalg.eigh(c)
        if (lam <= 0).any():
            where = " on the centroid-free subspace" if n_particles is not None else ""
            raise ValueError(f"covariance of component {int((lam <= 0).any(1).nonzero()[0])} "
                             f"is not positive definite{where}")
        self.register_buffer("means_sub", m)   # (K, D) model coordinates
        self.register_buffer("eigvals", lam)   # (K, D)
        self.register_buffer("eigvecs", u)     # (K, D, D)
        self.register_buffer("log_weights", weights.log())
        # a Python float, not shape arithmetic: traced shapes are tensors and would turn
        # this constant into float32 inside TorchScript
        self._log_norm = 0.5 * m.shape[1] * math.log(2 * math.pi)

    def config(self) -> dict:
        """Constructor arguments (plain lists and numbers), for :func:`save_model`."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "GaussianMixtureEnergy":
        config = dict(config)
        sde = sde_from_config(config.pop("sde"))
        return cls(sde=sde, **config)

    @property
    def n_components(self) -> int:
        return self.log_weights.shape[0]

    def _reduce(self, y):
        return to_subspace(y, self.basis) if self.n_particles is not None else y

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``-log p~_t(y)`` for model coordinates ``y`` (B, dim) and times ``t`` (B,)."""
        z = self._reduce(y)
        dt = z.dtype
        a = self.sde.alpha(t).to(dt)[:, None, None]
        v = self.sde.sigma2(t).to(dt)[:, None, None]
        diff = z[:, None, :] - a * self.means_sub.to(dt)[None]            # (B, K, D)
        proj = (diff.transpose(0, 1) @ self.eigvecs.to(dt)).transpose(0, 1)  # (B, K, D)
        var = a * a * self.eigvals.to(dt)[None] + v                      # (B, K, D)
        log_n = -0.5 * ((proj * proj / var).sum(-1) + var.log().sum(-1)) - self._log_norm
        return -torch.logsumexp(log_n + self.log_weights.to(dt), dim=-1)

    def log_prob(self, x, t=0.0) -> torch.Tensor:
        """Exact log density of positions at diffusion time ``t``, per nm^D.

        ``log p_t(x) = -E(x, t) - D log s``.
        """
        return -self.energy(x, t) - self.dof * math.log(self.length_scale)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from ``p_0``, in nm.

        Returns
        -------
        torch.Tensor, shape (n, N, 3) for particle models, (n, d) otherwise.
        """
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True,
                                 generator=generator)
        eps = torch.randn(n, self.means_sub.shape[1], generator=generator, dtype=torch.float64)
        z = self.means_sub[comp] + torch.einsum(
            "bdj,bj->bd", self.eigvecs[comp], self.eigvals[comp].sqrt() * eps)
        if self.n_particles is not None:
            return (from_subspace(z, self.basis) * self.length_scale).reshape(
                n, self.n_particles, 3)
        return z * self.length_scale


def _centred(means, weights):
    """Shift component means so that the mixture has zero mean, as centred data do.

    The prior ``N(0, I)`` at ``T`` is the exact marginal only for centred data: an
    off-centre mixture leaves an error of order ``alpha(T) |mean| |x_T|`` in ``log p_T``.
    """
    means = torch.as_tensor(means, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    w = (weights / weights.sum()).reshape(-1, *([1] * (means.dim() - 1)))
    return means - (w * means).sum(0, keepdim=True)


def mixture_1d(sde: LinearSDE | None = None) -> GaussianMixtureEnergy:
    """The three-mode 1D mixture of the Chen, Chu, Gray et al. (2025) reproduction.

    Modes at -1.5, 0.0 and 1.2 (shifted by +0.21 so that the mixture is centred), with
    standard deviations 0.15, 0.3, 0.2 and weights 0.3, 0.5, 0.2; total variance 0.98.
    """
    weights = [0.3, 0.5, 0.2]
    return GaussianMixtureEnergy(_centred([[-1.5], [0.0], [1.2]], weights),
                                 [0.15 ** 2, 0.3 ** 2, 0.2 ** 2], weights, sde=sde)


def mixture_2d(sde: LinearSDE | None = None) -> GaussianMixtureEnergy:
    """A centred 2D mixture of three strongly anisotropic, correlated components."""
    def rotated(sx, sy, angle):
        c, s = math.cos(angle), math.sin(angle)
        r = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        return r @ torch.diag(torch.tensor([sx * sx, sy * sy], dtype=torch.float64)) @ r.T

    means = [[-1.0, -0.5], [1.0, 0.3], [0.0, 1.2]]
    covs = torch.stack([rotated(0.5, 0.06, 0.6), rotated(0.35, 0.08, -1.0),
                        rotated(0.25, 0.2, 0.0)])
    weights = [0.4, 0.35, 0.25]
    return GaussianMixtureEnergy(_centred(means, weights), covs, weights, sde=sde)


def particle_mixture(n_particles: int = 22, n_components: int = 3, seed: int = 0,
                     sde: LinearSDE | None = None, length_scale: float = 1.0
                     ) -> GaussianMixtureEnergy:
    """A random mixture over ``N`` particles with full, anisotropic covariances.

    Means are random structures of unit spread (times ``length_scale``), shifted so
    that the mixture's mean structure is zero on the centroid-free subspace; each
    covariance is ``0.05 A A^T / 3N + 0.005 I`` (times ``length_scale^2``) for a random
    ``A``, so components are correlated, with variances between about 0.005 and 0.2
    (times ``length_scale^2``).
    """
    g = torch.Generator().manual_seed(seed)
    dim = 3 * n_particles
    means = torch.randn(n_components, n_particles, 3, generator=g, dtype=torch.float64)
    a = torch.randn(n_components, dim, dim, generator=g, dtype=torch.float64)
    covs = 0.05 * a @ a.transpose(1, 2) / dim + 0.005 * torch.eye(dim, dtype=torch.float64)
    weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
    means = _centred(means - means.mean(1, keepdim=True), weights)
    return GaussianMixtureEnergy(means * length_scale, covs * length_scale ** 2, weights,
                                 sde=sde, length_scale=length_scale)
