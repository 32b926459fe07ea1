"""Metropolis-adjusted Langevin moves on a learned energy.

An energy-parameterized model gives the unnormalized density ``exp(-E(y, t))`` of its own
marginal at every ``t``, so samples can be corrected with an exact Metropolis test
(MALA): the proposal ``y' = y + h s(y) + sqrt(2 h) z`` with ``s = -grad E`` is accepted
with probability ``min(1, exp(-E(y') + E(y)) q(y | y') / q(y' | y))``, ``q`` the Gaussian
proposal density. The chain leaves ``exp(-E(y, t))`` invariant whatever the step ``h``,
so it can only move samples toward the density the learned-force MD and the reweighting
read. Used as the corrector of :func:`openmm_diffenergy.sample` (predictor-corrector
sampling, Song et al. 2021, with the Metropolis test that an energy makes possible).
For particle systems the noise lives in the centred subspace, where the model is defined.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .coordinates import centre, check_time, subspace_noise
from .models.base import energy_and_score, model_dtype

__all__ = ["mala", "mala_chain"]


def default_step_size(sde, t: float) -> float:
    """``h = sigma(t)^2 / alpha(t)^2`` (model units^2).

    ``p_t`` is ``p_0`` scaled by ``alpha(t)`` and blurred by noise of width ``sigma(t)``
    in every direction, so no mode of it is narrower than ``sigma / alpha`` (in units of
    ``p_0``'s coordinates); Langevin steps of that width squared are accepted often (69%
    for the shipped alanine-dipeptide model at ``t = 0.001``, 95% at 0.3 times the step).
    """
    tt = torch.tensor(float(t), dtype=torch.float64)
    h = float(sde.sigma2(tt) / sde.alpha(tt) ** 2)
    if not h > 0:
        raise ValueError(f"sigma({t}) is 0, so there is no default step: give the step size")
    return h


def check_settings(sde, t: float, steps, step_size, names=("steps", "step_size")) -> float:
    """Check a number of MALA steps and return the step size (default or given)."""
    if int(steps) != steps or steps < 0:
        raise ValueError(f"{names[0]} must be a non-negative integer, got {steps}")
    h = default_step_size(sde, t) if step_size is None else float(step_size)
    if not (h > 0 and math.isfinite(h)):
        raise ValueError(f"{names[1]} must be a positive number, got {step_size}")
    return h


def mala_chain(energy_and_score_fn, y, steps: int, step_size: float,
               n_particles: int | None, generator=None, progress: bool = False,
               start=None):
    """MALA on any unnormalized density ``exp(-U(y))``.

    Parameters
    ----------
    energy_and_score_fn : callable
        ``y`` (B, dim) -> ``(U (B,), -grad U (B, dim))``, without a graph. Non-finite
        energies are treated as zero density (a move there is never accepted).
    y : torch.Tensor, shape (B, dim)
        Start; centred here for particle systems, whose noise lives in the centred
        subspace.
    steps : int
    step_size : float
        ``h``: the proposal is ``y + h s(y) + sqrt(2 h) z``, in the units of ``y`` squared.
    n_particles : int or None
    generator : torch.Generator, optional
    progress : bool
    start : tuple of torch.Tensor, optional
        ``(U, -grad U)`` at ``y`` when the caller has them already (saves one
        evaluation); ``U`` and the score must be translation-invariant for particles.

    Returns
    -------
    y : torch.Tensor, shape (B, dim)
    acceptance : float
        Mean over steps and samples (NaN for ``steps = 0``).
    """
    y = centre(y.detach().clone(), n_particles)
    h = float(step_size)

    def evaluate(v):
        e, s = energy_and_score_fn(v.detach())
        return torch.nan_to_num(e.detach(), nan=math.inf), s.detach()

    if start is None:
        e, s = evaluate(y)
    else:
        e, s = torch.nan_to_num(start[0].detach(), nan=math.inf), start[1].detach()
    accepted = 0.0
    for _ in tqdm(range(steps), desc="MALA", disable=not progress, leave=False):
        z = subspace_noise(y.shape, n_particles, generator=generator, dtype=y.dtype)
        drift = h * s
        y_new = y + drift + (2 * h) ** 0.5 * z
        e_new, s_new = evaluate(y_new)
        log_q_fwd = -((y_new - y - drift) ** 2).sum(-1) / (4 * h)
        log_q_rev = -((y - y_new - h * s_new) ** 2).sum(-1) / (4 * h)
        log_a = e - e_new + log_q_rev - log_q_fwd
        u = torch.rand(y.shape[0], generator=generator, dtype=y.dtype)
        take = (torch.log(u) < log_a) & torch.isfinite(e_new)   # NaN: never accepted
        y = torch.where(take[:, None], y_new, y)
        e = torch.where(take, e_new, e)
        s = torch.where(take[:, None], s_new, s)
        accepted += float(take.to(y.dtype).mean())
    return y, (accepted / steps if steps else float("nan"))


def mala_model_coordinates(model, y, t: float, steps: int, step_size: float,
                           generator=None, progress: bool = False):
    """MALA on ``exp(-E(y, t))`` in model coordinates ``y`` (B, dim); returns the moved
    copy and the mean acceptance rate."""
    tt = check_time(t, y.shape[0], dtype=y.dtype, device=y.device)
    return mala_chain(lambda v: energy_and_score(model, v, tt), y, steps, step_size,
                      model.n_particles, generator, progress)


def mala(model, x, steps: int, step_size: float | None = None, t: float | None = None,
         seed: int | None = None, progress: bool = False):
    """Move structures with Metropolis-adjusted Langevin steps on ``exp(-E(x, t))``.

    Parameters
    ----------
    model : EnergyModel
    x : torch.Tensor or array-like, shape (n, N, 3), (n, 3N) or (n, d)
        Starting positions in nm (vector models: their own units).
    steps : int
        Number of MALA steps (each one energy and gradient evaluation of the batch).
    step_size : float, optional
        Langevin step ``h`` in model units squared (``(nm / length_scale)^2``): the
        proposal is ``y + h s(y) + sqrt(2 h) z``. Default ``sigma(t)^2 / alpha(t)^2``
        (:func:`default_step_size`).
    t : float, optional
        Diffusion time of the target density; default ``model.t_min``.
    seed : int, optional
        Seeds the proposals and the accept tests.
    progress : bool

    Returns
    -------
    x : torch.Tensor
        Moved positions in nm, the shape of the input (centred for particle systems).
    info : dict
        ``steps``, ``step_size``, ``t``, ``acceptance`` (mean over steps and samples) and
        ``seconds``.
    """
    t = model.t_min if t is None else float(t)
    h = check_settings(model.sde, t, steps, step_size)
    x = torch.as_tensor(x, dtype=model_dtype(model))
    shape = x.shape
    y = model.to_model_coordinates(x)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    start = time.perf_counter()
    y, acceptance = mala_model_coordinates(model, y, t, int(steps), h, generator, progress)
    info = {"steps": int(steps), "step_size": h, "t": t, "acceptance": acceptance,
            "seconds": time.perf_counter() - start}
    return (y * model.length_scale).reshape(shape), info
