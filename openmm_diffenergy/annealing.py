"""Annealed importance sampling from a learned energy to a classical force field.

Importance weights between a learned proposal and a classical Boltzmann density are set
by the worst-matched directions. For a molecule these are the stiff bonds and angles: a
proposal whose 60 stiff modes are each a little too wide puts its weight on a handful
of samples, although it may describe the torsions, which one wants to reweight, well.

Annealed importance sampling (Neal 2001; Jarzynski's equality in MD) moves every sample
through the mixed densities

    pi_k(x) ~ exp(-(1 - beta_k) E_theta(x, t_min) - beta_k u(x) / kT),
    0 = beta_0 < beta_1 < ... < beta_K = 1,

alternating Metropolis-adjusted Langevin (MALA) steps that leave ``pi_k`` invariant
with the weight update ``log w += -(beta_{k+1} - beta_k) (u / kT - E_theta)(x)``. For
samples of ``exp(-E_theta)`` (learned-force MD) the weights are exact importance
weights for ``exp(-u / kT)`` whatever the schedule and step size; samples of another
density ``q`` (i.i.d. draws with their flow-ODE ``log q``) start from
``log w = -E_theta - log q``. Stiff modes relax within a few steps of each stage, so
their mismatch is paid for at equilibrium, in small pieces, instead of entering the
weights whole; torsions hardly move, and their mismatch stays in the weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import openmm
import torch
from openmm import unit
from tqdm.auto import tqdm

from .mcmc import check_settings, mala_chain
from .models.base import energy_and_score, model_dtype
from .openmm_force import kt_kj_per_mol

__all__ = ["ClassicalEnergy", "AnnealingResult", "anneal", "beta_schedule"]

_KJ_NM = unit.kilojoule_per_mole / unit.nanometer


class ClassicalEnergy:
    """Reduced energy ``u(x) / kT`` and its gradient under an OpenMM System.

    Parameters
    ----------
    system : openmm.System
    temperature : float or Quantity
        Kelvin.
    platform : str
        OpenMM platform ("Reference" is the fastest for tens of atoms: about 20 us an
        evaluation of alanine dipeptide).

    Calling it with positions ``x`` (n, N, 3) in nm returns ``u / kT`` (n,) and
    ``grad (u / kT)`` (n, N, 3) in 1/nm. Non-finite energies come back as ``+inf`` with a
    zero gradient.
    """

    def __init__(self, system: openmm.System, temperature, platform: str = "Reference"):
        if not isinstance(system, openmm.System):
            raise ValueError(f"system must be an openmm.System, got {type(system).__name__}")
        self.system = system
        self.n_particles = system.getNumParticles()
        self.kt = kt_kj_per_mol(temperature)
        self.context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                                      openmm.Platform.getPlatformByName(platform))

    def __call__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != (self.n_particles, 3):
            raise ValueError(f"positions must have shape (n, {self.n_particles}, 3), got "
                             f"{x.shape}")
        u = np.full(len(x), np.inf)
        grad = np.zeros_like(x)
        for i in range(len(x)):
            if not np.isfinite(x[i]).all():
                continue
            self.context.setPositions(x[i])
            state = self.context.getState(getEnergy=True, getForces=True)
            e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            f = state.getForces(asNumpy=True).value_in_unit(_KJ_NM)
            if math.isfinite(e) and np.isfinite(f).all():
                u[i] = e / self.kt
                grad[i] = -f / self.kt
        return u, grad


def beta_schedule(stages: int, power: float = 1.0) -> np.ndarray:
    """``beta_k = (k / K)^power`` for ``k = 0..K``; shape (K + 1,)."""
    if int(stages) != stages or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages}")
    if not (power > 0 and math.isfinite(power)):
        raise ValueError(f"power must be positive, got {power}")
    return (np.arange(int(stages) + 1) / int(stages)) ** float(power)


@dataclass
class AnnealingResult:
    """Samples carried from ``exp(-E_theta(x, t_min))`` to ``exp(-u / kT)``.

    Attributes
    ----------
    x : numpy.ndarray, shape (n, N, 3)
        Final positions, nm.
    log_w : numpy.ndarray, shape (n,)
        AIS log weights relative to the start density ``exp(-E_theta)`` (unnormalized;
        ``-inf`` where an energy was not finite).
    reduced_energy : numpy.ndarray, shape (n,)
        ``u / kT`` at ``x``.
    learned_energy : numpy.ndarray, shape (n,)
        ``E_theta(x, t_min)`` at ``x`` (kT).
    info : dict
        ``betas``, ``steps_per_stage``, ``step_size`` (model units^2), ``acceptance``
        (mean per stage), ``seconds``.
    """

    x: np.ndarray
    log_w: np.ndarray
    reduced_energy: np.ndarray
    learned_energy: np.ndarray
    info: dict = field(default_factory=dict)


def anneal(model, target: ClassicalEnergy, x, betas=None, steps_per_stage: int = 10,
           step_size: float | None = None, t_min: float | None = None,
           batch_size: int = 512, seed: int = 0, progress: bool = True) -> AnnealingResult:
    """Carry samples of ``exp(-E_theta(x, t_min))`` to ``exp(-u / kT)`` by AIS.

    Parameters
    ----------
    model : EnergyModel
        A particle model on the target's atoms.
    target : ClassicalEnergy
    x : array-like, shape (n, N, 3)
        Start positions, nm.
    betas : array-like, shape (K + 1,), optional
        Increasing from 0 to 1; default :func:`beta_schedule` ``(50)``.
    steps_per_stage : int
        MALA steps at each ``beta_k``, ``k < K`` (the first ones, at ``beta = 0``, are
        MALA on the learned energy alone).
    step_size : float, optional
        MALA step ``h`` in model units squared; default ``sigma(t)^2 / alpha(t)^2``
        (:func:`openmm_diffenergy.mcmc.default_step_size`).
    t_min : float, optional
        Default ``model.t_min``.
    batch_size : int
        Samples annealed together.
    seed : int
    progress : bool

    Returns
    -------
    AnnealingResult
    """
    if getattr(model, "n_particles", None) != target.n_particles:
        raise ValueError(f"the model acts on {getattr(model, 'n_particles', None)} "
                         f"particles but the System has {target.n_particles}")
    t = model.t_min if t_min is None else float(t_min)
    h = check_settings(model.sde, t, steps_per_stage, step_size,
                       ("steps_per_stage", "step_size"))
    betas = beta_schedule(50) if betas is None else np.asarray(betas, dtype=np.float64)
    if (betas.ndim != 1 or betas.size < 2 or betas[0] != 0.0 or betas[-1] != 1.0
            or not (np.diff(betas) > 0).all()):
        raise ValueError("betas must increase strictly from 0 to 1")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (target.n_particles, 3):
        raise ValueError(f"x must have shape (n, {target.n_particles}, 3), got {x.shape}")
    s = float(model.length_scale)
    dtype = model_dtype(model)
    generator = torch.Generator().manual_seed(int(seed))
    start = time.perf_counter()

    def components(y):
        """``E_theta``, ``u/kT`` (B,) and their scores (B, dim) in model coordinates."""
        tt = torch.full((y.shape[0],), t, dtype=dtype)
        y = y.detach()
        e, se = energy_and_score(model, y.to(dtype).clone(), tt)
        u, gu = target((y * s).reshape(y.shape[0], -1, 3).numpy())
        e = torch.nan_to_num(e.detach().double(), nan=math.inf)
        return (e, se.detach().double(), torch.from_numpy(u),
                -torch.from_numpy(gu).reshape(y.shape) * s)

    def combine(beta, e, se, u, su):
        """``U_beta`` and its score from the components."""
        # beta = 0 or 1 must not see the other term's infinities
        energy = (e if beta < 1 else 0.0) * (1 - beta) + (u if beta > 0 else 0.0) * beta
        return energy, (1 - beta) * se + beta * su

    def mixed(beta):
        return lambda y: combine(beta, *components(y))

    out_x, out_w, out_u, out_e = [], [], [], []
    acceptance = np.zeros(betas.size - 1)
    n_batches = max(1, math.ceil(len(x) / int(batch_size)))
    bar = tqdm(total=(betas.size - 1) * n_batches, desc="annealing", disable=not progress)
    for chunk in np.array_split(x, n_batches):
        y = torch.from_numpy(chunk.reshape(len(chunk), -1) / s)
        log_w = torch.zeros(len(chunk), dtype=torch.float64)
        parts = None            # components at y, carried into the next stage's chain
        for k in range(betas.size - 1):
            beta = float(betas[k])
            y, acc = mala_chain(mixed(beta), y, int(steps_per_stage), h, model.n_particles,
                                generator, start=None if parts is None else combine(beta,
                                                                                   *parts))
            acceptance[k] += acc * len(chunk) / len(x) if steps_per_stage else 0.0
            parts = components(y)
            e, u = parts[0], parts[2]
            log_w = log_w - float(betas[k + 1] - beta) * (u - e)
            bar.update(1)
        log_w = torch.nan_to_num(log_w, nan=-math.inf)
        out_x.append((y * s).reshape(chunk.shape).numpy())
        out_w.append(log_w.numpy())
        out_u.append(u.numpy())
        out_e.append(e.numpy())
    bar.close()
    info = {"betas": betas.tolist(), "stages": int(betas.size - 1),
            "steps_per_stage": int(steps_per_stage), "step_size": h, "t_min": t,
            "acceptance": acceptance.tolist(),
            "mean_acceptance": float(acceptance.mean()) if steps_per_stage else float("nan"),
            "seconds": time.perf_counter() - start}
    return AnnealingResult(np.concatenate(out_x), np.concatenate(out_w),
                           np.concatenate(out_u), np.concatenate(out_e), info)
