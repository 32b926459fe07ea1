"""The model interface: an energy-parameterized diffusion model.

A model is a ``torch.nn.Module`` whose ``forward(y, t)`` returns the energy ``E(y, t)``
in units of kT for a batch of *model coordinates* ``y`` (shape ``(B, dim)``, positions
divided by the model's ``length_scale``) and diffusion times ``t`` (shape ``(B,)``). The
score is ``-grad_y E``. ``forward`` is the fast path used inside solvers and
``torch.func`` transforms; users call :meth:`EnergyModel.energy` and :func:`score`,
which take positions in nm and check their input.
"""
from __future__ import annotations

import math

import torch

from ..coordinates import check_time, dof, flatten_positions

__all__ = ["EnergyModel", "score", "score_fn", "model_dtype", "energy_and_score"]


class EnergyModel(torch.nn.Module):
    """Base class of energy-parameterized diffusion models.

    Parameters
    ----------
    dim : int
        Flattened size of one configuration: ``3N`` for particle systems, ``d`` for vectors.
    n_particles : int or None
        Number of particles ``N``; ``None`` for plain vectors.
    length_scale : float
        Length scale ``s`` in nm; the model sees ``x / s``.
    t_min : float
        Diffusion time at which ``E(x, t_min)`` is read as the learned energy.

    Notes
    -----
    Subclasses implement ``forward(y, t)`` with ``y`` of shape (B, dim) in model
    coordinates and ``t`` of shape (B,), returning shape (B,) in kT. It must be written
    with differentiable torch operations, without data-dependent Python control flow,
    so that ``torch.func`` can take its Hessian. Particle models must be invariant
    under translation.
    """

    def __init__(self, dim: int, n_particles: int | None = None, length_scale: float = 1.0,
                 t_min: float = 0.0):
        super().__init__()
        if n_particles is not None and dim != 3 * n_particles:
            raise ValueError(f"a model of {n_particles} particles has dim {3 * n_particles}, "
                             f"not {dim}")
        if not (length_scale > 0 and math.isfinite(length_scale)):
            raise ValueError(f"length_scale must be a positive number of nm, got {length_scale}")
        if not 0.0 <= t_min <= 1.0:
            raise ValueError(f"t_min must lie in [0, 1], got {t_min}")
        self.dim = int(dim)
        self.n_particles = None if n_particles is None else int(n_particles)
        self.length_scale = float(length_scale)
        self.t_min = float(t_min)

    @property
    def dof(self) -> int:
        """Degrees of freedom ``D``: ``3(N - 1)`` for particles, ``dim`` for vectors."""
        return dof(self.dim, self.n_particles)

    def to_model_coordinates(self, x) -> torch.Tensor:
        """Check positions (nm) and return model coordinates ``x / s``, shape (B, dim)."""
        return flatten_positions(x, self.dim, self.n_particles) / self.length_scale

    def energy(self, x, t) -> torch.Tensor:
        """Energy ``E(x, t)`` in kT.

        Parameters
        ----------
        x : torch.Tensor, shape (B, N, 3), (B, 3N) or (B, d)
            Positions in nm (for vector models, in the model's own units).
        t : float or torch.Tensor of shape (B,)
            Diffusion time(s) in [0, 1].

        Returns
        -------
        torch.Tensor, shape (B,)
        """
        y = self.to_model_coordinates(x)
        return self(y, check_time(t, y.shape[0], dtype=y.dtype, device=y.device))


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating parameter or buffer
    (float64 when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float64


def energy_and_score(model: torch.nn.Module, y: torch.Tensor, t: torch.Tensor,
                     create_graph: bool = False):
    """``E(y, t)`` (B,) and the score ``-grad_y E`` (B, dim) of a batch in model coordinates,
    by autograd (also inside ``torch.no_grad``); ``create_graph`` keeps the graph of the
    score for a loss."""
    with torch.enable_grad():
        if not y.requires_grad:
            y = y.requires_grad_(True)
        e = model(y, t)
        (g,) = torch.autograd.grad(e.sum(), y, create_graph=create_graph)
    return e, -g


def score_fn(model: torch.nn.Module):
    """The score ``s(y, t) = -grad_y E(y, t)`` in model coordinates, as a function.

    The returned callable maps ``y`` (B, dim) and ``t`` (B,) to (B, dim). It is built
    from ``torch.func.grad`` so that it composes with ``vmap``/``jacrev``/``vjp``. Its
    ``model`` attribute is ``model`` (the fast divergence estimators read it).
    """
    def energy_sum(y, t):
        return model(y, t).sum()

    grad = torch.func.grad(energy_sum)

    def fn(y, t):
        return -grad(y, t)

    fn.model = model
    return fn


def score(model: EnergyModel, x, t) -> torch.Tensor:
    """Score ``-grad_x E(x, t)`` of a model, in 1/nm.

    Parameters
    ----------
    model : EnergyModel
    x : torch.Tensor, shape (B, N, 3), (B, 3N) or (B, d)
        Positions in nm.
    t : float or torch.Tensor of shape (B,)
        Diffusion time(s) in [0, 1].

    Returns
    -------
    torch.Tensor, same shape as ``x``.
    """
    y = model.to_model_coordinates(x)
    tt = check_time(t, y.shape[0], dtype=y.dtype, device=y.device)
    return (score_fn(model)(y, tt) / model.length_scale).reshape(x.shape)
