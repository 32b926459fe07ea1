"""Coordinates: batching, the centroid-free subspace of particle systems, input checks.

A model acts either on plain vectors, ``x`` of shape ``(B, d)``, or on particle systems,
``x`` of shape ``(B, N, 3)`` (positions in nm; ``(B, 3N)`` flattened is accepted too).
Molecular densities are translation invariant, so particle systems live on the
centroid-free subspace ``sum_i x_i = 0`` with ``D = 3(N - 1)`` degrees of freedom.
The centroid is the unweighted mean of the positions; for a translation-invariant
energy the choice of centre does not change any energy or force.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "dof",
    "centre",
    "subspace_basis",
    "to_subspace",
    "from_subspace",
    "subspace_noise",
    "flatten_positions",
    "check_time",
]


def dof(dim: int, n_particles: int | None) -> int:
    """Degrees of freedom: ``3(N - 1)`` for ``N`` particles, ``dim`` for plain vectors."""
    return 3 * (n_particles - 1) if n_particles is not None else dim


def centre(y: torch.Tensor, n_particles: int | None) -> torch.Tensor:
    """Remove the centroid of flattened particle coordinates.

    Parameters
    ----------
    y : torch.Tensor, shape (B, 3N) or (B, d)
    n_particles : int or None
        ``None`` for plain vectors, which are returned unchanged.
    """
    if n_particles is None:
        return y
    p = y.reshape(y.shape[0], n_particles, 3)
    return (p - p.mean(dim=1, keepdim=True)).reshape(y.shape)


def subspace_basis(n_particles: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal basis ``H`` of the N-vectors orthogonal to ``(1, ..., 1)`` (Helmert).

    Returns
    -------
    torch.Tensor, shape (N, N - 1)
        ``H.T @ H = I`` and ``H.T @ 1 = 0``. The basis of the centroid-free subspace of
        ``R^{3N}`` is ``kron(H, I_3)``.
    """
    n = n_particles
    h = torch.zeros(n, n - 1, dtype=torch.float64)
    for j in range(1, n):
        h[:j, j - 1] = 1.0 / math.sqrt(j * (j + 1))
        h[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return h.to(dtype)


def to_subspace(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates on the centroid-free subspace.

    Parameters
    ----------
    y : torch.Tensor, shape (B, 3N)
    basis : torch.Tensor, shape (N, N - 1), from :func:`subspace_basis`

    Returns
    -------
    torch.Tensor, shape (B, 3(N - 1))
    """
    n = basis.shape[0]
    p = y.reshape(y.shape[0], n, 3)
    return torch.einsum("nj,bnc->bjc", basis.to(y.dtype), p).reshape(y.shape[0], -1)


def from_subspace(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_subspace`: shape (B, 3(N - 1)) to centred (B, 3N)."""
    n = basis.shape[0]
    q = z.reshape(z.shape[0], n - 1, 3)
    return torch.einsum("nj,bjc->bnc", basis.to(z.dtype), q).reshape(z.shape[0], 3 * n)


def subspace_noise(shape, n_particles: int | None, generator=None, dtype=torch.float64,
                   device=None) -> torch.Tensor:
    """Standard normal noise on the model's space.

    For particle systems the noise is isotropic on the centroid-free subspace (a centred
    3N-dimensional standard normal), so its squared norm has ``D = 3(N - 1)`` degrees of
    freedom.
    """
    eps = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return centre(eps, n_particles)


def flatten_positions(x, dim: int, n_particles: int | None, name: str = "x") -> torch.Tensor:
    """Check a batch of positions and return it flattened to ``(B, dim)``.

    Raises
    ------
    ValueError
        If ``x`` is not a floating tensor of shape ``(B, N, 3)`` / ``(B, 3N)`` (particle
        models) or ``(B, d)`` (vector models), or holds NaN or inf.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if n_particles is not None:
        expected = f"(B, {n_particles}, 3) or (B, {dim})"
        if x.dim() == 3:
            if x.shape[2] != 3:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}: the last dimension of a particle "
                    f"array must be 3 (x, y, z); expected {expected}")
            if x.shape[1] != n_particles:
                raise ValueError(
                    f"{name} has {x.shape[1]} particles but the model is for {n_particles}; "
                    f"expected {expected}")
        elif x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {expected}")
    elif x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (B, {dim})")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return x.reshape(x.shape[0], dim)


def check_time(t, batch: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Check diffusion times and broadcast them to shape ``(B,)``.

    Parameters
    ----------
    t : float or torch.Tensor of shape () or (B,)
        Diffusion time(s) in [0, 1].
    batch : int
        The batch size B.

    Raises
    ------
    ValueError
        If ``t`` is not finite, lies outside [0, 1], or has the wrong shape.
    """
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    elif t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or shape ({batch},)")
    if not torch.isfinite(t).all():
        raise ValueError("t holds NaN or inf values; expected diffusion times in [0, 1]")
    if (t < 0).any() or (t > 1).any():
        raise ValueError(
            f"t must lie in [0, 1]; got values in [{t.min().item():g}, {t.max().item():g}]")
    return t
