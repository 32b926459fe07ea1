"""Boltzmann reweighting of learned samples to a classical force field.

Two kinds of samples, one formula (DESIGN.md section 4)::

    i.i.d. samples from the model, density q:   log w_i = -u(x_i)/kT - log q(x_i)
    frames of MD driven by the learned force:   log w_i = -u(x_i)/kT + E_theta(x_i, t_min)

``u`` is the classical potential energy (kJ/mol) and ``kT = R T``. Weights are
self-normalized with ``logsumexp``; the Kish effective sample size is
``(sum w)^2 / sum w^2 / n``, reported as a fraction of ``n``.

``log q`` of i.i.d. samples must be the density of the sampler itself, so
:func:`sample_with_likelihood` integrates the probability-flow ODE from the prior to
``t_min`` with the exact divergence, carrying ``log q`` along each sample's own path, with
an adaptive solver (fixed uniform RK4 steps were tens of nats off on the shipped
all-atom model). A Hutchinson ``log q`` would make ``exp(log w)`` biased.

Free energies of a collective variable (CV) come from weighted histograms,
``F_b = -ln P_b`` in kT (and kJ/mol), with bootstrap error bars.
:func:`lambda_free_energy` estimates ``Delta F = F_b - F_a = -ln(Z_b / Z_a)`` between two
Hamiltonians (a learned energy and a classical System, or two Systems) with BAR and MBAR
(pymbar) over linearly mixed OpenMM systems ``U_lambda = (1 - lambda) U_a + lambda U_b``.

Units: energies in kJ/mol, positions in nm and temperatures in kelvin when plain numbers
are given; ``openmm.unit`` quantities are converted.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import openmm
import torch
from openmm import unit
from tqdm.auto import tqdm

from .flow import (flow_log_density, folded_log_density, mirror_fold,
                   sample_with_likelihood)
from .annealing import ClassicalEnergy, anneal, beta_schedule
from .flow import denoise as _denoise_step
from .models.base import model_dtype
from .openmm_force import (_quantity, create_force, kt_kj_per_mol, openmm_seed,
                           scaled_force)

__all__ = ["log_importance_weights", "importance_weights", "ess", "potential_energies",
           "potential_forces", "reduced_energies", "model_energies", "collective_variable", "FreeEnergyProfile",
           "free_energy_profile", "profile_rmse", "sample_with_likelihood", "flow_log_density",
           "mirror_fold", "folded_log_density", "run_learned_md",
           "ReweightingResult", "reweight_iid", "reweight_md", "FreeEnergyDifference",
           "free_energy_from_energies", "lambda_free_energy"]


# --------------------------------------------------------------------------- input checks

def _vector(values, name: str, energy_unit=None) -> np.ndarray:
    """A 1-D float64 array from a sequence, array, tensor or Quantity (converted)."""
    if unit.is_quantity(values):
        if energy_unit is None or not values.unit.is_compatible(energy_unit):
            raise ValueError(f"{name} must be in units compatible with {energy_unit}, got "
                             f"{values.unit}")
        values = values.value_in_unit(energy_unit)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} holds {int(np.isnan(arr).sum())} NaN values")
    return arr


def _positions(xyz, n_particles: int | None = None, name: str = "positions") -> np.ndarray:
    """Frames as a float64 array (F, N, 3) in nm, from arrays, tensors, Quantities or
    mdtraj trajectories; checks the atom count and finiteness."""
    if hasattr(xyz, "xyz") and hasattr(xyz, "topology"):      # mdtraj.Trajectory
        xyz = xyz.xyz
    if unit.is_quantity(xyz):
        xyz = xyz.value_in_unit(unit.nanometer)
    if isinstance(xyz, torch.Tensor):
        xyz = xyz.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(xyz, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (F, N, 3) or (N, 3), got {arr.shape}")
    if n_particles is not None and arr.shape[1] != n_particles:
        raise ValueError(f"{name} hold {arr.shape[1]} atoms per frame but the System / "
                         f"model has {n_particles}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=(1, 2)).sum())
        raise ValueError(f"{name}: {bad} frame(s) hold NaN or inf coordinates")
    return arr


def _kt(temperature) -> float:
    """kT in kJ/mol; a clear error for a non-positive or non-temperature input."""
    return kt_kj_per_mol(temperature)


# --------------------------------------------------------------------------- weights

def log_importance_weights(log_q=None, reduced_target_energy=None, learned_energy=None,
                           target_energy=None, temperature=None) -> np.ndarray:
    """Normalized log importance weights (``logsumexp = 0``) toward ``exp(-u/kT)``.

    Give the proposal as exactly one of ``log_q`` (i.i.d. samples) or ``learned_energy``
    (frames sampled from ``exp(-E_theta)``, e.g. learned-force MD), and the target as
    exactly one of ``reduced_target_energy`` or ``target_energy`` with ``temperature``.

    Parameters
    ----------
    log_q : array-like, shape (n,)
        Log density of the proposal at each sample (nats); any additive constant.
    reduced_target_energy : array-like, shape (n,)
        ``u(x) / kT`` (dimensionless). ``+inf`` means zero target density.
    learned_energy : array-like, shape (n,)
        ``E_theta(x, t_min)`` in kT (``log q = -E + const``).
    target_energy : array-like or Quantity, shape (n,)
        ``u(x)`` in kJ/mol (plain numbers) or any energy unit (Quantity).
    temperature : Quantity or float
        Kelvin; needed with ``target_energy``.

    Returns
    -------
    numpy.ndarray, shape (n,)
        ``log w_i`` with ``sum_i exp(log w_i) = 1``; ``-inf`` for zero weight.

    Raises
    ------
    ValueError
        On NaN input, mismatched shapes, both or neither of a pair given, a ``+inf``
        log weight (a sample with zero proposal density), or all weights zero.
    """
    if (log_q is None) == (learned_energy is None):
        raise ValueError("give exactly one of log_q (i.i.d. samples) or learned_energy "
                         "(samples of exp(-E_theta), e.g. learned-force MD)")
    if (reduced_target_energy is None) == (target_energy is None):
        raise ValueError("give exactly one of reduced_target_energy (u/kT) or "
                         "target_energy (kJ/mol) with temperature")
    if target_energy is not None:
        if temperature is None:
            raise ValueError("target_energy needs a temperature")
        u = _vector(target_energy, "target_energy", unit.kilojoule_per_mole) / _kt(temperature)
    else:
        u = _vector(reduced_target_energy, "reduced_target_energy")
    if np.any(u == -np.inf):
        raise ValueError("reduced_target_energy holds -inf (an infinite target density)")
    if log_q is not None:
        proposal = -_vector(log_q, "log_q")
    else:
        proposal = _vector(learned_energy, "learned_energy")
    if proposal.shape != u.shape:
        raise ValueError(f"proposal ({proposal.shape[0]} samples) and target "
                         f"({u.shape[0]} samples) differ in length")
    if np.any(proposal == np.inf):
        raise ValueError("a sample has zero proposal density (log q = -inf or E = +inf), "
                         "so its importance weight is infinite")
    with np.errstate(invalid="ignore"):
        log_w = proposal - u
    finite = np.isfinite(log_w)
    if not finite.any():
        raise ValueError("every importance weight is zero (target energy +inf everywhere)")
    log_w = np.where(finite, log_w, -np.inf)
    return log_w - _logsumexp(log_w)


def _logsumexp(a: np.ndarray) -> float:
    m = np.max(a)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(a - m))))


def importance_weights(log_q=None, reduced_target_energy=None, learned_energy=None,
                       target_energy=None, temperature=None) -> np.ndarray:
    """Self-normalized importance weights toward the Boltzmann density ``exp(-u/kT)``.

    Same arguments as :func:`log_importance_weights`; i.i.d. samples::

        w = de.importance_weights(log_q=-res.nll, reduced_target_energy=u_over_kt)

    and learned-force MD frames: ``learned_energy=E_theta(x, t_min)`` instead of ``log_q``.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Non-negative weights that sum to 1.
    """
    return np.exp(log_importance_weights(log_q, reduced_target_energy, learned_energy,
                                         target_energy, temperature))


def ess(log_w) -> float:
    """Kish effective sample size as a fraction: ``(sum w)^2 / (n sum w^2)``.

    Parameters
    ----------
    log_w : array-like, shape (n,)
        Log weights, normalized or not (any additive constant); ``-inf`` is weight 0.

    Returns
    -------
    float
        In ``[1/n, 1]``; 1 when all weights are equal.
    """
    lw = _vector(log_w, "log_w")
    if np.any(lw == np.inf):
        raise ValueError("log_w holds +inf")
    if not np.isfinite(lw).any():
        raise ValueError("every weight is zero")
    return float(np.exp(2 * _logsumexp(lw) - _logsumexp(2 * lw)) / lw.size)


# --------------------------------------------------------------------------- energies

def _evaluate(system, xyz, platform, groups, progress, forces):
    if not isinstance(system, openmm.System):
        raise ValueError(f"system must be an openmm.System, got {type(system).__name__}")
    arr = _positions(xyz, system.getNumParticles())
    ctx = openmm.Context(system, openmm.VerletIntegrator(1.0 * unit.femtoseconds),
                         openmm.Platform.getPlatformByName(platform))
    kwargs = {} if groups is None else {"groups": set(int(g) for g in groups)}
    out = np.empty((len(arr), arr.shape[1], 3) if forces else len(arr))
    for i in tqdm(range(len(arr)), desc="classical forces" if forces else "classical energies",
                  disable=not progress, leave=False):
        ctx.setPositions(arr[i])
        state = ctx.getState(getEnergy=not forces, getForces=forces, **kwargs)
        out[i] = (state.getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer) if forces else
            state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    del ctx
    return out


def potential_energies(system: openmm.System, xyz, platform: str = "Reference",
                       groups=None, progress: bool = False) -> np.ndarray:
    """Potential energy of every frame under an OpenMM System.

    Parameters
    ----------
    system : openmm.System
    xyz : array-like, Quantity or mdtraj.Trajectory, shape (F, N, 3) or (N, 3)
        Positions in nm; ``N`` must equal the System's particle count.
    platform : str
        OpenMM platform name ("Reference" is the fastest for tens of atoms).
    groups : set of int, optional
        Force groups to include (all by default).
    progress : bool

    Returns
    -------
    numpy.ndarray, shape (F,)
        kJ/mol. Overlapping atoms may give ``+inf`` (zero Boltzmann weight).
    """
    out = _evaluate(system, xyz, platform, groups, progress, forces=False)
    return np.where(np.isnan(out), np.inf, out)


def potential_forces(system: openmm.System, xyz, platform: str = "Reference",
                     groups=None, progress: bool = False) -> np.ndarray:
    """Forces ``-grad u`` on every particle of every frame under an OpenMM System.

    Divided by ``kT`` they are the data scores ``grad log p_0`` that target score
    matching (:class:`~openmm_diffenergy.training.TrainConfig`) trains on.

    Parameters
    ----------
    system, xyz, platform, groups, progress
        As in :func:`potential_energies`.

    Returns
    -------
    numpy.ndarray, shape (F, N, 3)
        kJ/mol/nm.

    Raises
    ------
    ValueError
        If a force is NaN or infinite (overlapping atoms).
    """
    out = _evaluate(system, xyz, platform, groups, progress, forces=True)
    bad = ~np.isfinite(out).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} frames have non-finite forces (first: frame "
                         f"{int(np.flatnonzero(bad)[0])}); overlapping atoms?")
    return out


def reduced_energies(system: openmm.System, xyz, temperature=300.0 * unit.kelvin,
                     platform: str = "Reference", progress: bool = False) -> np.ndarray:
    """``u(x) / kT`` for every frame (see :func:`potential_energies`); shape (F,)."""
    kt = _kt(temperature)
    return potential_energies(system, xyz, platform, progress=progress) / kt


def model_energies(model, xyz, t_min: float | None = None,
                   batch_size: int = 1024) -> np.ndarray:
    """Learned energy ``E_theta(x, t_min)`` in kT for every frame, shape (F,).

    Parameters
    ----------
    model : EnergyModel
    xyz : array-like, shape (F, N, 3), nm
    t_min : float, optional
        Default ``model.t_min``.
    batch_size : int
    """
    arr = _positions(xyz, model.n_particles)
    t = model.t_min if t_min is None else float(t_min)
    dtype = model_dtype(model)
    out = []
    with torch.no_grad():
        for chunk in np.array_split(arr, max(1, math.ceil(len(arr) / batch_size))):
            out.append(model.energy(torch.as_tensor(chunk, dtype=dtype), t).double().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------- profiles

def collective_variable(xyz, cv, topology=None) -> np.ndarray:
    """Values of a collective variable for every frame.

    Parameters
    ----------
    xyz : array-like, shape (F, N, 3), nm
    cv : {"phi", "psi"} or callable
        Backbone dihedrals (radians, through mdtraj; needs ``topology``), or a function
        of the frames (F, N, 3) returning shape (F,).
    topology : openmm.app.Topology or mdtraj.Topology, optional

    Returns
    -------
    numpy.ndarray, shape (F,)
    """
    arr = _positions(xyz)
    if callable(cv):
        out = np.asarray(cv(arr), dtype=np.float64).reshape(-1)
        if out.shape[0] != arr.shape[0]:
            raise ValueError(f"the CV function returned {out.shape[0]} values for "
                             f"{arr.shape[0]} frames")
        return out
    if cv not in ("phi", "psi"):
        raise ValueError(f"cv must be 'phi', 'psi' or a callable, got {cv!r}")
    if topology is None:
        raise ValueError(f"the {cv} dihedral needs a topology")
    import mdtraj

    top = topology if isinstance(topology, mdtraj.Topology) else \
        mdtraj.Topology.from_openmm(topology)
    if top.n_atoms != arr.shape[1]:
        raise ValueError(f"the topology has {top.n_atoms} atoms, the frames {arr.shape[1]}")
    traj = mdtraj.Trajectory(arr, top)
    idx, values = (mdtraj.compute_phi if cv == "phi" else mdtraj.compute_psi)(traj)
    if values.shape[1] != 1:
        raise ValueError(f"the topology has {values.shape[1]} {cv} dihedrals; pass a "
                         "callable to choose one")
    return values[:, 0].astype(np.float64)


@dataclass
class FreeEnergyProfile:
    """A free-energy profile ``F(s) = -ln P(s)`` along one collective variable.

    Attributes
    ----------
    edges : numpy.ndarray, shape (bins + 1,)
        Bin edges in the CV's units.
    f_kt : numpy.ndarray, shape (bins,)
        Free energy per bin in kT, aligned as ``align`` says; ``inf`` in empty bins.
    error_kt : numpy.ndarray, shape (bins,)
        Bootstrap standard error (kT); ``nan`` where undetermined.
    population : numpy.ndarray, shape (bins,)
        Weighted fraction of the samples in each bin (sums to 1 over the range).
    counts : numpy.ndarray of int, shape (bins,)
        Raw sample counts per bin.
    kt_kj_per_mol : float
        kT used for the kJ/mol views.
    align : str
        "min" (minimum at 0) or "mean" (population-weighted mean 0).
    """

    edges: np.ndarray
    f_kt: np.ndarray
    error_kt: np.ndarray
    population: np.ndarray
    counts: np.ndarray
    kt_kj_per_mol: float
    align: str

    @property
    def centres(self) -> np.ndarray:
        """Bin centres, shape (bins,)."""
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @property
    def f_kj_per_mol(self) -> np.ndarray:
        """Free energy per bin in kJ/mol."""
        return self.f_kt * self.kt_kj_per_mol

    @property
    def error_kj_per_mol(self) -> np.ndarray:
        """Bootstrap standard error in kJ/mol."""
        return self.error_kt * self.kt_kj_per_mol

    def to_dict(self) -> dict:
        """JSON-friendly dict (``inf``/``nan`` become ``None``)."""
        def clean(a):
            return [float(v) if np.isfinite(v) else None for v in np.asarray(a, dtype=float)]

        return {"edges": clean(self.edges), "f_kt": clean(self.f_kt),
                "error_kt": clean(self.error_kt), "population": clean(self.population),
                "counts": [int(c) for c in self.counts], "kt_kj_per_mol": self.kt_kj_per_mol,
                "align": self.align}


def _profile_from_hist(pop: np.ndarray, align: str) -> np.ndarray:
    with np.errstate(divide="ignore"):
        f = -np.log(pop)
    finite = np.isfinite(f)
    if not finite.any():
        return f
    if align == "min":
        return f - f[finite].min()
    p = pop[finite] / pop[finite].sum()
    return f - float((p * f[finite]).sum())


def free_energy_profile(values, weights=None, bins: int = 36, range=None,
                        temperature=300.0 * unit.kelvin, n_bootstrap: int = 100,
                        block_size: int = 1, align: str = "min",
                        seed: int | None = 0) -> FreeEnergyProfile:
    """Weighted-histogram free-energy profile with bootstrap error bars.

    Parameters
    ----------
    values : array-like, shape (n,)
        CV value of each sample (use :func:`collective_variable`).
    weights : array-like, shape (n,), optional
        Non-negative importance weights (any normalization); uniform by default.
    bins : int
        Number of equal-width bins.
    range : (float, float), optional
        Histogram range; default the values' min and max. Use ``(-pi, pi)`` for dihedrals.
    temperature : Quantity or float
        Kelvin; sets the kJ/mol scale.
    n_bootstrap : int
        Bootstrap replicates (0 for none): samples, or blocks of ``block_size``
        consecutive samples (for correlated MD frames), are drawn with replacement with
        their weights, and each replicate's profile is aligned the same way.
    block_size : int
    align : {"min", "mean"}
        Shift so that the minimum is 0, or the population-weighted mean is 0.
    seed : int, optional

    Returns
    -------
    FreeEnergyProfile
    """
    x = _vector(values, "values")
    if not np.isfinite(x).all():
        raise ValueError("values hold inf")
    w = np.ones_like(x) if weights is None else _vector(weights, "weights")
    if w.shape != x.shape:
        raise ValueError(f"weights ({w.shape[0]}) and values ({x.shape[0]}) differ in length")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    if align not in ("min", "mean"):
        raise ValueError(f"align must be 'min' or 'mean', got {align!r}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    kt = _kt(temperature)
    lo, hi = (float(x.min()), float(x.max())) if range is None else map(float, range)
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, int(bins) + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, int(bins) - 1)
    inside = (x >= lo) & (x <= hi)

    def hist(sel_w):
        h = np.bincount(idx[inside], weights=sel_w[inside], minlength=int(bins))
        return h / h.sum() if h.sum() > 0 else h

    pop = hist(w)
    f = _profile_from_hist(pop, align)
    counts = np.bincount(idx[inside], minlength=int(bins))
    err = np.full(int(bins), np.nan)
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        n_blocks = math.ceil(len(x) / block_size)
        reps = []
        for _ in np.arange(int(n_bootstrap)):
            starts = rng.integers(0, n_blocks, n_blocks) * block_size
            take = (starts[:, None] + np.arange(block_size)[None]).ravel()
            take = take[take < len(x)]
            hw = np.bincount(take, minlength=len(x)).astype(float) * w
            reps.append(_profile_from_hist(hist(hw), align))
        reps = np.array(reps)
        reps[~np.isfinite(reps)] = np.nan
        enough = (np.isfinite(reps).sum(0) >= 2) & np.isfinite(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            err = np.where(enough, np.nanstd(reps, axis=0, ddof=1), np.nan)
    return FreeEnergyProfile(edges, f, err, pop, counts, kt, align)


def profile_rmse(profile: FreeEnergyProfile, reference: FreeEnergyProfile,
                 min_population: float = 0.01) -> dict:
    """RMSE (kT) between two profiles over the reference's well-populated bins.

    Bins with reference population ``>= min_population`` are compared. Both profiles
    are aligned on those bins by their reference-population-weighted mean (the offset
    of a free energy is arbitrary). A compared bin where ``profile`` has no weight at all
    is counted in ``n_missing`` and left out of the RMSE.

    Returns
    -------
    dict
        ``rmse_kt``, ``max_abs_kt``, ``n_bins`` (compared), ``n_missing``.
    """
    if not np.allclose(profile.edges, reference.edges):
        raise ValueError("the profiles have different bins")
    mask = reference.population >= float(min_population)
    ok = mask & np.isfinite(profile.f_kt) & np.isfinite(reference.f_kt)
    n_missing = int((mask & ~np.isfinite(profile.f_kt)).sum())
    if not ok.any():
        return {"rmse_kt": float("nan"), "max_abs_kt": float("nan"), "n_bins": 0,
                "n_missing": n_missing}
    p = reference.population[ok] / reference.population[ok].sum()
    d = profile.f_kt[ok] - reference.f_kt[ok]
    d = d - float((p * d).sum())
    return {"rmse_kt": float(np.sqrt(np.mean(d * d))), "max_abs_kt": float(np.abs(d).max()),
            "n_bins": int(ok.sum()), "n_missing": n_missing}


# --------------------------------------------------------------------------- i.i.d. samples

# --------------------------------------------------------------------------- MD

def _time_ps(value, name: str) -> float:
    return _quantity(value, unit.picosecond, name)


def _langevin_context(system, temperature, timestep_ps, friction_per_ps, platform: str,
                      seed: int):
    """A Langevin (middle) integrator at ``temperature`` K and a Context of ``system``."""
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin,
                                            friction_per_ps / unit.picosecond,
                                            timestep_ps * unit.picosecond)
    integ.setRandomNumberSeed(openmm_seed(seed))
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform))
    return ctx, integ


def _run_frames(ctx, integ, positions, temperature, n_frames: int, steps_per_frame: int,
                equilibration_steps: int, seed: int, progress: bool, desc: str):
    """Start ``ctx`` at ``positions`` with fresh velocities and record frames.

    Stops at the first error or non-finite frame. Returns frames (F, N, 3) nm and
    ``None`` or the reason it stopped early.
    """
    ctx.setPositions(positions)
    ctx.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))
    frames, stopped = [], None
    try:
        if equilibration_steps:
            integ.step(int(equilibration_steps))
        for k in tqdm(range(n_frames), desc=desc, disable=not progress, leave=False):
            integ.step(int(steps_per_frame))
            x = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(
                unit.nanometer)
            if not np.isfinite(x).all():
                stopped = f"non-finite positions at frame {k}"
                break
            frames.append(np.array(x))
    except Exception as err:     # OpenMM raises when the learned force sees NaN positions
        stopped = f"{type(err).__name__} after {len(frames)} frames: {str(err)[:200]}"
    n = ctx.getSystem().getNumParticles()
    return (np.stack(frames) if frames else np.zeros((0, n, 3))), stopped


def _simulate(system, positions, temperature, timestep_ps, friction_per_ps, n_frames: int,
              steps_per_frame: int, equilibration_steps: int, platform: str, seed: int,
              progress: bool, desc: str):
    """Langevin MD in a Context of its own (see :func:`_run_frames`)."""
    ctx, integ = _langevin_context(system, temperature, timestep_ps, friction_per_ps,
                                   platform, seed)
    try:
        return _run_frames(ctx, integ, positions, temperature, n_frames, steps_per_frame,
                           equilibration_steps, seed, progress, desc)
    finally:
        del ctx, integ


def _particle_system(system: openmm.System) -> openmm.System:
    """A System with the same particles (masses) and constraints, and no forces."""
    out = openmm.System()
    for i in range(system.getNumParticles()):
        out.addParticle(system.getParticleMass(i))
    for i in range(system.getNumConstraints()):
        out.addConstraint(*system.getConstraintParameters(i))
    return out


def _md_settings(temperature, timestep, friction, save_interval, n_frames, equilibration):
    t = _quantity(temperature, unit.kelvin, "temperature")
    dt = _time_ps(timestep, "timestep")
    fr = _quantity(friction, unit.picosecond ** -1, "friction")
    save = _time_ps(save_interval, "save_interval")
    steps = max(1, int(round(save / dt)))
    if int(n_frames) != n_frames or n_frames < 1:
        raise ValueError(f"the number of frames must be a positive integer, got {n_frames}")
    equil = 0.0 if equilibration in (0, None) else _time_ps(equilibration, "equilibration")
    return t, dt, fr, steps, int(round(equil / dt))


def run_learned_md(model, system: openmm.System, positions, temperature=None,
                   n_frames: int = 100, save_interval=1.0, timestep=0.001, friction=1.0,
                   equilibration=0.0, n_replicas: int = 1, platform: str = "Reference",
                   backend: str = "torchforce", seed: int = 0, batch: bool = True,
                   t_min: float | None = None, progress: bool = False) -> list:
    """Langevin MD driven by the learned force alone, for one or many replicas.

    With ``batch`` (the default) all replicas run in one Context: non-interacting copies
    of the particles (:func:`~openmm_diffenergy.systems.replicate_system`) and one learned
    force that evaluates them as a batch, many times faster than one Context each. A
    blow-up (NaN positions, or the force raising) then stops every replica, with the
    frames so far kept. With ``batch=False`` each replica has its own Context and
    a replica that blows up stops alone.

    Parameters
    ----------
    model : EnergyModel
        A particle model with ``model.n_particles == system.getNumParticles()``.
    system : openmm.System
        Supplies the masses and constraints (its forces are not used).
    positions : array-like or Quantity, shape (N, 3) or (n_replicas, N, 3)
        Start positions in nm.
    temperature : Quantity or float, optional
        Kelvin; default the model's training temperature (``metadata``) or 300 K.
    n_frames : int
        Frames per replica.
    save_interval, timestep, equilibration : Quantity or float
        Picoseconds (defaults 1 ps, 0.001 ps = 1 fs, 0).
    friction : Quantity or float
        Collision rate in 1/ps.
    n_replicas : int
    platform, backend : str
        OpenMM platform; learned-force backend (see :func:`create_force`).
    seed : int
        Seeds velocities and the integrator (replica r uses ``seed + r`` without
        ``batch``).
    batch : bool
        All replicas in one Context (see above).
    t_min : float, optional
        Diffusion time at which the learned energy is read; default ``model.t_min``.
    progress : bool

    Returns
    -------
    list of dict, one per replica
        ``frames`` (F, N, 3) nm, ``stopped`` (None or the reason), ``time_ps`` (F,).
    """
    temperature = _default_temperature(model, temperature)
    _check_model_system(model, system)
    if int(n_replicas) != n_replicas or n_replicas < 1:
        raise ValueError(f"n_replicas must be a positive integer, got {n_replicas}")
    start = _positions(positions, system.getNumParticles(), "start positions")
    if len(start) not in (1, n_replicas):
        raise ValueError(f"give one start structure or one per replica ({n_replicas}), "
                         f"got {len(start)}")
    t, dt, fr, steps, equil = _md_settings(temperature, timestep, friction, save_interval,
                                           n_frames, equilibration)
    md_system = _particle_system(system)
    if batch and n_replicas > 1:
        from .systems import replicate_system
        n = system.getNumParticles()
        batched = replicate_system(md_system, int(n_replicas))
        batched.addForce(create_force(model, temperature=t, t_min=t_min, backend=backend,
                                      n_replicas=int(n_replicas)))
        starts = np.stack([start[r % len(start)] for r in range(int(n_replicas))])
        frames, stopped = _simulate(batched, starts.reshape(-1, 3), t, dt, fr, int(n_frames),
                                    steps, equil, platform, seed, progress,
                                    f"learned MD, {n_replicas} replicas")
        if stopped:
            warnings.warn(f"learned-force MD ({n_replicas} replicas in one Context) stopped: "
                          f"{stopped}", RuntimeWarning)
        frames = frames.reshape(len(frames), int(n_replicas), n, 3)
        time_ps = (equil + steps * np.arange(1, len(frames) + 1)) * dt
        return [{"frames": frames[:, r], "stopped": stopped, "time_ps": time_ps}
                for r in range(int(n_replicas))]
    md_system.addForce(create_force(model, temperature=t, t_min=t_min, backend=backend))
    out = []
    for r in range(int(n_replicas)):
        frames, stopped = _simulate(md_system, start[r % len(start)], t, dt, fr, int(n_frames),
                                    steps, equil, platform, seed + r, progress,
                                    f"learned MD replica {r + 1}/{n_replicas}")
        if stopped:
            warnings.warn(f"learned-force MD replica {r} stopped: {stopped}", RuntimeWarning)
        out.append({"frames": frames, "stopped": stopped,
                    "time_ps": (equil + steps * np.arange(1, len(frames) + 1)) * dt})
    return out


def _default_temperature(model, temperature) -> float:
    if temperature is None:
        temperature = getattr(model, "metadata", {}).get("temperature", 300.0)
    return _quantity(temperature, unit.kelvin, "temperature")


def _check_model_system(model, system):
    if not isinstance(system, openmm.System):
        raise ValueError(f"system must be an openmm.System, got {type(system).__name__}")
    if getattr(model, "n_particles", None) is None:
        raise ValueError("reweighting needs a particle model")
    if model.n_particles != system.getNumParticles():
        raise ValueError(f"the model acts on {model.n_particles} atoms but the System has "
                         f"{system.getNumParticles()}; reweighting needs the same atoms")


# --------------------------------------------------------------------------- drivers

@dataclass
class ReweightingResult:
    """Samples reweighted to a classical Boltzmann density.

    Attributes
    ----------
    x : numpy.ndarray, shape (n, N, 3)
        The samples (nm) that entered the weights.
    log_weights : numpy.ndarray, shape (n,)
        Normalized log weights (``logsumexp = 0``).
    reduced_energy : numpy.ndarray, shape (n,)
        Classical ``u / kT``.
    proposal : numpy.ndarray, shape (n,)
        ``-log q`` (nats, per nm^D; i.i.d.) or ``E_theta(x, t_min)`` (kT; MD); with
        annealing ``log w + u/kT`` (unnormalized).
    ess : float
        Kish effective sample size as a fraction of ``n``.
    cvs : dict of str -> numpy.ndarray (n,)
    profiles : dict of str -> FreeEnergyProfile
        Reweighted (target) profiles.
    proposal_profiles : dict of str -> FreeEnergyProfile
        Unweighted profiles of the samples themselves.
    info : dict
        Counts (requested, used, dropped), timings, settings, replica status.
    """

    x: np.ndarray
    log_weights: np.ndarray
    reduced_energy: np.ndarray
    proposal: np.ndarray
    ess: float
    cvs: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    proposal_profiles: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def weights(self) -> np.ndarray:
        """Normalized weights, shape (n,)."""
        return np.exp(self.log_weights)


def _cv_specs(cvs, topology):
    if cvs is None:
        cvs = ("phi", "psi") if topology is not None else ()
    if isinstance(cvs, dict):
        return dict(cvs)
    return {c: c for c in cvs}


def _profiles(x, log_w, cvs, topology, temperature, bins, ranges, n_bootstrap, block_size,
              seed):
    values, profiles, plain = {}, {}, {}
    w = np.exp(log_w)
    for name, cv in cvs.items():
        v = collective_variable(x, cv, topology)
        rng = (ranges or {}).get(name, (-math.pi, math.pi) if cv in ("phi", "psi") else None)
        values[name] = v
        kw = dict(bins=bins, range=rng, temperature=temperature, n_bootstrap=n_bootstrap,
                  block_size=block_size, seed=seed)
        profiles[name] = free_energy_profile(v, w, **kw)
        plain[name] = free_energy_profile(v, None, **kw)
    return values, profiles, plain


def _denoised(model, x, proposal, info, t_min=None):
    """Apply :func:`denoise` to samples of ``q`` with ``-log q = proposal`` (plus a constant).

    Returns the denoised samples and ``proposal + log det J``, without the samples whose
    step is not invertible (counted in ``info["n_dropped"]`` and ``info["denoise_failed"]``).
    """
    x0, logdet = _denoise_step(model, x, t=t_min)
    ok = np.isfinite(logdet) & np.isfinite(x0).all(axis=tuple(range(1, x0.ndim)))
    info.update(denoised=True, denoise_failed=int((~ok).sum()),
                denoise_mean_logdet=float(np.mean(logdet[ok])) if ok.any() else float("nan"))
    info["n_dropped"] = info.get("n_dropped", 0) + int((~ok).sum())
    if not ok.any():
        raise ValueError("the denoising step is not invertible at any sample")
    return x0[ok], np.asarray(proposal, dtype=np.float64)[ok] + logdet[ok]


def _check_anneal(anneal_stages, denoise):
    if int(anneal_stages) != anneal_stages or anneal_stages < 0:
        raise ValueError(f"anneal_stages must be a non-negative integer, got {anneal_stages}")
    if anneal_stages and denoise:
        raise ValueError("denoise and anneal_stages are alternatives (both deal with the "
                         "t_min noise); choose one")


def _annealed(model, system, temperature, platform, x, log_w0, stages, steps, step_size,
              power, seed, progress, info):
    """Carry samples with log weights ``log_w0`` toward ``exp(-E_theta)`` on to the
    classical density by AIS (:func:`~openmm_diffenergy.annealing.anneal`).

    Returns the final samples and an effective proposal ``p`` with
    ``log w = -u(x)/kT + p``, the form :func:`_finish` takes.
    """
    target = ClassicalEnergy(system, temperature, platform)
    res = anneal(model, target, x, betas=beta_schedule(stages, power),
                 steps_per_stage=steps, step_size=step_size, seed=seed, progress=progress)
    log_w = np.asarray(log_w0, dtype=np.float64) + res.log_w
    ok = np.isfinite(log_w) & np.isfinite(res.reduced_energy)
    info["annealing"] = dict(res.info, n_zero_weight=int((~ok).sum()))
    return res.x, np.where(ok, log_w + np.where(ok, res.reduced_energy, 0.0), -np.inf)


def _finish(x, proposal, kind, system, temperature, topology, cvs, bins, ranges, n_bootstrap,
            block_size, seed, platform, progress, info, condition):
    u = reduced_energies(system, x, temperature, platform, progress)
    if condition is not None:
        inside = np.asarray(condition(x), dtype=bool).reshape(-1)
        if inside.shape != u.shape:
            raise ValueError(f"condition returned {inside.size} values for {u.size} samples")
        u = np.where(inside, u, np.inf)
        info.setdefault("condition_fraction", float(inside.mean()))
    if kind == "iid":
        log_w = log_importance_weights(log_q=-proposal, reduced_target_energy=u)
    else:
        log_w = log_importance_weights(learned_energy=proposal, reduced_target_energy=u)
    values, profiles, plain = _profiles(x, log_w, _cv_specs(cvs, topology), topology,
                                        temperature, bins, ranges, n_bootstrap, block_size,
                                        seed)
    info.update(n_used=int(len(x)), temperature_K=float(temperature), bins=int(bins),
                n_bootstrap=int(n_bootstrap), block_size=int(block_size))
    return ReweightingResult(x, log_w, u, proposal, ess(log_w), values, profiles, plain, info)


def reweight_iid(model, system: openmm.System, n: int = 256, temperature=None,
                 topology=None, cvs=None, bins: int = 36, ranges=None, n_bootstrap: int = 100,
                 solver: str = "dopri5", rtol: float = 1e-7, atol: float = 1e-7,
                 steps: int = 200, divergence="exact", batch_size: int = 32, seed: int = 0,
                 platform: str = "Reference", condition=None, fold: bool = False,
                 dtype: torch.dtype | None = None, denoise: bool = False,
                 anneal_stages: int = 0, anneal_steps: int = 10, anneal_step_size=None,
                 anneal_power: float = 1.0, samples=None,
                 progress: bool = True) -> ReweightingResult:
    """Draw i.i.d. samples from the model and reweight them to ``exp(-u/kT)``.

    Samples and their exact ``log q`` come from :func:`sample_with_likelihood`; the
    classical energy of every sample from ``system`` (use the System the reference
    data were made with). ``log w = -u/kT - log q``.

    Parameters
    ----------
    model : EnergyModel
        Must act on all ``system.getNumParticles()`` atoms, in the System's order.
    system : openmm.System
        The classical target.
    n : int
        Number of samples drawn. Samples whose position or ``log q`` is not finite
        (a blown-up ODE solve) are dropped and counted in ``info["n_dropped"]``.
    temperature : Quantity or float, optional
        Target temperature, kelvin; default the model's training temperature or 300 K.
    topology : openmm.app.Topology or mdtraj.Topology, optional
        Needed for the "phi"/"psi" CVs.
    cvs : sequence of {"phi", "psi"} or dict of name -> ("phi" | "psi" | callable), optional
        Default ``("phi", "psi")`` when a topology is given.
    bins, ranges, n_bootstrap
        Profile settings (see :func:`free_energy_profile`); ``ranges`` maps a CV name to
        its histogram range (dihedrals default to ``(-pi, pi)``).
    solver, rtol, atol, steps, divergence, batch_size, seed
        Sampler settings (see :func:`sample_with_likelihood`).
    platform : str
        OpenMM platform for the classical energies.
    condition : callable, optional
        ``condition(x) -> bool array (n,)``: restricts the target to a region (zero
        density outside). Amber energies are mirror-symmetric, so to compare with MD
        that stays in one enantiomer, restrict to it (e.g. L-chirality).
    fold : bool
        Mirror-fold the samples into ``condition`` (:func:`mirror_fold`) instead of
        giving the outside zero weight. The folded sampler's exact density is
        ``q(x) + q(Rx)``, which costs one more likelihood solve per sample
        (:func:`folded_log_density`, same solver settings).
    dtype : torch.dtype, optional
        Compute the likelihoods with a copy of the model in this dtype (e.g.
        ``torch.float64``: float32 adaptive solves can fail on stiff models).
    denoise : bool
        Take the samples (after folding) one probability-flow step on from ``t_min`` to 0
        (:func:`~openmm_diffenergy.flow.denoise`) and add the step's exact ``log det J`` to
        ``-log q``. It removes most of the ``t_min`` noise from the stiff bonds, whose
        widening otherwise caps the ESS against a classical force field.
    anneal_stages : int
        With ``K > 0``, carry every sample on to the classical density by annealed
        importance sampling (:func:`~openmm_diffenergy.annealing.anneal`): the weight
        starts at ``-E_theta(x, t_min) - log q(x)`` and gains
        ``-(beta_{k+1} - beta_k) (u/kT - E_theta)`` at each of ``K`` stages, with
        ``anneal_steps`` MALA steps (step ``anneal_step_size``, model units^2) at each
        ``beta_k = (k/K)^anneal_power``. The weights stay exact; the stiff modes relax
        instead of entering the weights whole. An alternative to ``denoise``.
    anneal_steps, anneal_step_size, anneal_power
        See ``anneal_stages``.
    samples : tuple of (array-like (n, N, 3), array-like (n,)), optional
        Draws of the model (nm) with their exact ``-log q`` (:func:`sample_with_likelihood`
        with the same ``t_min``), used instead of drawing ``n`` new ones.
    progress : bool

    Returns
    -------
    ReweightingResult
        With annealing, ``x`` are the annealed samples, ``proposal`` is
        ``log w + u/kT`` (unnormalized) and ``info["annealing"]`` has the schedule and
        the acceptance per stage. ``info["condition_fraction"]``: the fraction of samples inside ``condition``
        (before folding); with ``fold``, ``info["mirrored"]`` counts the reflected ones.
    """
    temperature = _default_temperature(model, temperature)
    _check_model_system(model, system)
    start = time.perf_counter()
    if fold and condition is None:
        raise ValueError("fold=True needs a condition to fold the samples into")
    flow_model = model if dtype is None else copy.deepcopy(model).to(dtype)
    _check_anneal(anneal_stages, denoise)
    settings = dict(solver=solver, rtol=rtol, atol=atol, steps=steps, divergence=divergence,
                    batch_size=batch_size, seed=seed, progress=progress)
    if samples is None:
        res = sample_with_likelihood(flow_model, n, **settings)
        x = res.x.detach().to(torch.float64).numpy()
        nll = res.nll.detach().to(torch.float64).numpy()
        info = {"sampler_failures": res.method.get("failures", []), "sampler": res.method,
                "sample_seconds": res.method["seconds"]}
    else:
        x = np.asarray(samples[0], dtype=np.float64).reshape(-1, model.n_particles, 3)
        nll = np.asarray(samples[1], dtype=np.float64).reshape(-1)
        if len(x) != len(nll):
            raise ValueError(f"samples: {len(x)} structures but {len(nll)} -log q values")
        n = len(x)
        info = {"sampler": "given"}
    ok = np.isfinite(x).all(axis=(1, 2)) & np.isfinite(nll)
    if not ok.any():
        raise ValueError("every sample blew up (non-finite positions or log q)")
    info.update(kind="iid", n_requested=int(n), n_dropped=int((~ok).sum()))
    if fold:
        x, nll = x[ok], nll[ok]
        nll, density = folded_log_density(flow_model, x, nll, **settings)
        x, mirrored = mirror_fold(x, condition)
        info.update(condition_fraction=float(1.0 - mirrored.mean()),
                    mirrored=int(mirrored.sum()), density=density,
                    density_failures=density.get("failures", []))
        ok = np.isfinite(nll)
        info["n_dropped"] += int((~ok).sum())
    x, nll = x[ok], nll[ok]
    if denoise:
        x, nll = _denoised(flow_model, x, nll, info)
    if anneal_stages:
        # log w0 = log exp(-E_theta) - log q: the samples, weighted to the learned energy
        log_w0 = -model_energies(model, x) + nll
        x, nll = _annealed(model, system, temperature, platform, x, log_w0, anneal_stages,
                           anneal_steps, anneal_step_size, anneal_power, seed, progress,
                           info)
    out = _finish(x, nll, "iid", system, temperature, topology, cvs, bins, ranges,
                  n_bootstrap, 1, seed, platform, progress, info, condition)
    out.info["seconds"] = time.perf_counter() - start
    return out


def reweight_md(model, system: openmm.System, positions=None, frames=None, temperature=None,
                topology=None, cvs=None, bins: int = 36, ranges=None,
                n_bootstrap: int = 100, block_size: int = 10, n_frames: int = 100,
                save_interval=1.0, timestep=0.001, friction=1.0, equilibration=0.0,
                n_replicas: int = 1, platform: str = "Reference", backend: str = "torchforce",
                seed: int = 0, condition=None, denoise: bool = False,
                anneal_stages: int = 0, anneal_steps: int = 10, anneal_step_size=None,
                anneal_power: float = 1.0, progress: bool = True) -> ReweightingResult:
    """Reweight frames of learned-force MD to ``exp(-u/kT)``: ``log w = -u/kT + E_theta``.

    MD with the learned force samples ``exp(-E_theta(x, t_min))`` whatever its
    temperature (the force is ``kT E_theta``), so no likelihood integral is needed.

    Parameters
    ----------
    model : EnergyModel
    system : openmm.System
        The classical target; also supplies masses and constraints for the MD.
    positions : array-like, shape (N, 3) or (n_replicas, N, 3), optional
        Start structures (nm); the MD is run with :func:`run_learned_md`.
    frames : array-like, shape (F, N, 3), optional
        Frames already sampled from ``exp(-E_theta)``; give these instead of
        ``positions`` to skip the MD.
    temperature : Quantity or float, optional
        Kelvin (target and MD thermostat); default the model's or 300 K.
    topology, cvs, bins, ranges, n_bootstrap
        As in :func:`reweight_iid`.
    block_size : int
        Bootstrap block length in frames (MD frames are correlated).
    n_frames, save_interval, timestep, friction, equilibration, n_replicas, backend, seed
        MD settings (see :func:`run_learned_md`).
    platform : str
    condition : callable, optional
        Restricts the target to a region (see :func:`reweight_iid`).
    denoise : bool
        Take the frames one probability-flow step on to ``t = 0`` and add the step's
        exact ``log det J`` to ``E_theta`` (see :func:`reweight_iid`).
    anneal_stages, anneal_steps, anneal_step_size, anneal_power
        Carry the frames on to the classical density by annealed importance sampling
        (see :func:`reweight_iid`); the weights start at 0. ``block_size`` still refers
        to the order of the frames.
    progress : bool

    Returns
    -------
    ReweightingResult
        ``info["replicas"]`` lists each replica's frame count and why it stopped early,
        if it did.
    """
    temperature = _default_temperature(model, temperature)
    _check_model_system(model, system)
    _check_anneal(anneal_stages, denoise)
    if (positions is None) == (frames is None):
        raise ValueError("give exactly one of positions (to run MD) or frames")
    start = time.perf_counter()
    info = {"kind": "md"}
    if frames is None:
        runs = run_learned_md(model, system, positions, temperature=temperature,
                              n_frames=n_frames, save_interval=save_interval,
                              timestep=timestep, friction=friction,
                              equilibration=equilibration, n_replicas=n_replicas,
                              platform=platform, backend=backend, seed=seed,
                              progress=progress)
        info["replicas"] = [{"frames": len(r["frames"]), "stopped": r["stopped"]}
                            for r in runs]
        info["md_seconds"] = time.perf_counter() - start
        x = np.concatenate([r["frames"] for r in runs])
        if len(x) == 0:
            raise ValueError("no MD frames survived: " + "; ".join(
                str(r["stopped"]) for r in runs))
    else:
        x = _positions(frames, system.getNumParticles(), "frames")
    info["n_requested"] = int(n_frames * n_replicas) if frames is None else int(len(x))
    info["n_dropped"] = info["n_requested"] - int(len(x))
    energy = model_energies(model, x)
    if denoise:
        x, energy = _denoised(model, x, energy, info)
    if anneal_stages:
        x, energy = _annealed(model, system, temperature, platform, x, np.zeros(len(x)),
                              anneal_stages, anneal_steps, anneal_step_size, anneal_power,
                              seed, progress, info)
    out = _finish(x, energy, "md", system, temperature, topology, cvs, bins, ranges,
                  n_bootstrap, block_size, seed, platform, progress, info, condition)
    out.info["seconds"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------- BAR / MBAR

@dataclass
class FreeEnergyDifference:
    """``Delta F = F_b - F_a = -ln(Z_b / Z_a)`` between two Hamiltonians.

    Attributes
    ----------
    delta_f_kt, error_kt : float
        MBAR estimate over all lambda states and its standard error (kT).
    delta_f_bar_kt, error_bar_kt : float
        Sum of BAR estimates between neighbouring lambda states; errors in quadrature.
    lambdas : numpy.ndarray, shape (K,)
    n_k : numpy.ndarray of int, shape (K,)
        Samples per state used (after subsampling).
    kt_kj_per_mol : float
    info : dict
        Statistical inefficiencies, ``bar_steps_kt`` (BAR ``Delta F`` of each
        neighbouring pair; steps of many kT mean poor overlap), ``neighbour_overlap``
        (MBAR overlap matrix entries ``O[k, k+1]``; near 0 means the estimate and its
        error bar are not to be trusted), failures, timings.
    """

    delta_f_kt: float
    error_kt: float
    delta_f_bar_kt: float
    error_bar_kt: float
    lambdas: np.ndarray
    n_k: np.ndarray
    kt_kj_per_mol: float
    info: dict = field(default_factory=dict)

    @property
    def delta_f_kj_per_mol(self) -> float:
        """MBAR ``Delta F`` in kJ/mol."""
        return self.delta_f_kt * self.kt_kj_per_mol

    @property
    def delta_f_bar_kj_per_mol(self) -> float:
        """BAR ``Delta F`` in kJ/mol."""
        return self.delta_f_bar_kt * self.kt_kj_per_mol


def _lambdas(lambdas) -> np.ndarray:
    lam = _vector(lambdas, "lambdas")
    if lam.size < 2 or not np.all(np.diff(lam) > 0) or lam[0] != 0.0 or lam[-1] != 1.0:
        raise ValueError("lambdas must increase strictly from 0 to 1 (at least 2 values)")
    return lam


def free_energy_from_energies(energy_a, energy_b, state, lambdas,
                              temperature=300.0 * unit.kelvin,
                              subsample: bool = False) -> FreeEnergyDifference:
    """BAR and MBAR ``Delta F = F_b - F_a`` from samples of ``U_lambda = (1-lambda) U_a + lambda U_b``.

    Parameters
    ----------
    energy_a, energy_b : array-like or Quantity, shape (n,)
        ``U_a`` and ``U_b`` of every sample, kJ/mol (plain numbers).
    state : array-like of int, shape (n,)
        Index into ``lambdas`` of the state each sample was drawn from; within a state,
        samples in time order.
    lambdas : array-like, shape (K,)
        Strictly increasing from 0 (Hamiltonian a) to 1 (Hamiltonian b).
    temperature : Quantity or float
        Kelvin.
    subsample : bool
        Keep every g-th sample of each state, with g the statistical inefficiency of
        ``U_b - U_a`` there (pymbar.timeseries), so that correlated MD frames do not
        shrink the error bars.

    Returns
    -------
    FreeEnergyDifference
        ``nan`` estimates (with the reason in ``info``) if pymbar fails.
    """
    import pymbar
    from pymbar import timeseries

    kt = _kt(temperature)
    ua = _vector(energy_a, "energy_a", unit.kilojoule_per_mole) / kt
    ub = _vector(energy_b, "energy_b", unit.kilojoule_per_mole) / kt
    lam = _lambdas(lambdas)
    st = np.asarray(state)
    if st.shape != ua.shape or ub.shape != ua.shape:
        raise ValueError(f"energy_a {ua.shape}, energy_b {ub.shape} and state {st.shape} "
                         "must have the same shape")
    if st.dtype.kind not in "iu" or st.min() < 0 or st.max() >= lam.size:
        raise ValueError(f"state must hold integer indices into lambdas (0..{lam.size - 1})")
    if not (np.isfinite(ua).all() and np.isfinite(ub).all()):
        raise ValueError("energies must be finite")
    keep, g_k = [], []
    for k in range(lam.size):
        idx = np.flatnonzero(st == k)
        g = 1.0
        if subsample and idx.size > 10 and np.ptp(ub[idx] - ua[idx]) > 0:
            g = float(timeseries.statistical_inefficiency(ub[idx] - ua[idx]))
            idx = idx[np.asarray(timeseries.subsample_correlated_data(ub[idx] - ua[idx], g=g),
                                 dtype=int)]
        keep.append(idx)
        g_k.append(g)
    n_k = np.array([len(i) for i in keep])
    order = np.concatenate(keep)
    u_kn = (1.0 - lam)[:, None] * ua[order][None] + lam[:, None] * ub[order][None]
    info = {"statistical_inefficiency": g_k, "n_samples_raw": int(ua.size)}
    bar_f, bar_var = 0.0, 0.0
    off = np.concatenate([[0], np.cumsum(n_k)])
    try:
        for k in range(lam.size - 1):
            if n_k[k] == 0 or n_k[k + 1] == 0:
                raise ValueError(f"lambda state {k} or {k + 1} has no samples")
            here, there = slice(off[k], off[k + 1]), slice(off[k + 1], off[k + 2])
            fwd = u_kn[k + 1, here] - u_kn[k, here]      # work k -> k+1 on samples of k
            rev = u_kn[k, there] - u_kn[k + 1, there]    # work k+1 -> k on samples of k+1
            r = pymbar.bar(fwd, rev, compute_uncertainty=True)
            bar_f += float(r["Delta_f"])
            bar_var += float(r["dDelta_f"]) ** 2
            info.setdefault("bar_steps_kt", []).append(float(r["Delta_f"]))
    except Exception as err:
        bar_f = bar_var = float("nan")
        info["bar_error"] = f"{type(err).__name__}: {err}"
    try:
        # a constant per state changes f_k by that constant only; removing each row's
        # minimum keeps the solver's numbers small when the Hamiltonians differ by a large
        # offset (a learned energy's normalization), and it is added back exactly
        shift = u_kn.min(axis=1)
        mbar = pymbar.MBAR(u_kn - shift[:, None], n_k)
        r = mbar.compute_free_energy_differences(compute_uncertainty=True)
        mb_f = float(r["Delta_f"][0, -1] + shift[-1] - shift[0])
        mb_err = float(r["dDelta_f"][0, -1])
        overlap = np.asarray(mbar.compute_overlap()["matrix"])
        info["neighbour_overlap"] = [float(overlap[k, k + 1]) for k in range(lam.size - 1)]
    except Exception as err:
        mb_f = mb_err = float("nan")
        info["mbar_error"] = f"{type(err).__name__}: {err}"
    return FreeEnergyDifference(mb_f, mb_err, bar_f, math.sqrt(bar_var), lam, n_k, kt, info)


LAMBDA_STATE = "lambda_state"


def _hamiltonian_force(h, scale: str, temperature: float, backend: str) -> openmm.Force:
    """``scale * U_h`` as one CustomCVForce: cloned System forces, or the learned force.

    ``scale`` is an expression in :data:`LAMBDA_STATE`, the one global parameter that
    selects the lambda state of the mixed Context.
    """
    if isinstance(h, openmm.System):
        forces = [openmm.XmlSerializer.clone(f) for f in h.getForces()
                  if not isinstance(f, openmm.CMMotionRemover)]
    else:
        forces = [create_force(h, temperature=temperature, backend=backend)]
    return scaled_force(forces, scale, {LAMBDA_STATE: 0.0})


def _global_parameters(h) -> dict:
    out = {}
    if isinstance(h, openmm.System):
        for f in h.getForces():
            for i in range(getattr(f, "getNumGlobalParameters", lambda: 0)()):
                out[f.getGlobalParameterName(i)] = f.getGlobalParameterDefaultValue(i)
    return out


def _check_global_parameters(a, b):
    """Mixed states hold both Hamiltonians' forces; a shared global parameter must agree."""
    pa, pb = _global_parameters(a), _global_parameters(b)
    clash = sorted(k for k in set(pa) & set(pb) if pa[k] != pb[k])
    if clash:
        raise ValueError(f"both Hamiltonians define the global parameter(s) {clash} with "
                         "different default values; rename them in one System")
    if LAMBDA_STATE in pa or LAMBDA_STATE in pb:
        raise ValueError(f"the global parameter {LAMBDA_STATE!r} selects the lambda state; "
                         "rename it in the System that defines it")


class _Evaluator:
    """Full-strength ``U_h`` (kJ/mol) of frames for a System or a learned model."""

    def __init__(self, h, temperature: float, platform: str):
        self.h, self.kt, self.platform = h, kt_kj_per_mol(temperature), platform

    def __call__(self, xyz) -> np.ndarray:
        if isinstance(self.h, openmm.System):
            return potential_energies(self.h, xyz, self.platform)
        return self.kt * model_energies(self.h, xyz)


def lambda_free_energy(hamiltonian_a, hamiltonian_b, positions, lambdas=None,
                       temperature=300.0 * unit.kelvin, n_frames: int = 100,
                       save_interval=0.1, timestep=0.001, friction=1.0, equilibration=1.0,
                       platform: str = "Reference", backend: str = "torchforce",
                       subsample: bool = True, seed: int = 0,
                       progress: bool = True) -> FreeEnergyDifference:
    """``Delta F = F_b - F_a`` by BAR/MBAR over lambda-mixed OpenMM systems.

    State ``k`` has ``U_k = (1 - lambda_k) U_a + lambda_k U_b``. All states share one
    OpenMM Context: each Hamiltonian (a System's forces, cloned, or the learned force) is
    one ``CustomCVForce`` scaled by ``1 - lambda_state`` or ``lambda_state``, a global
    parameter set per state (:data:`LAMBDA_STATE`). Each state is simulated with Langevin
    MD from ``positions`` and fresh velocities (seed ``seed + k``; the integrator's own
    random stream continues from state to state); ``U_a`` and ``U_b`` of every frame enter
    :func:`free_energy_from_energies`. A state whose MD fails keeps the frames it made
    (reason in ``info["states"]``).

    Parameters
    ----------
    hamiltonian_a, hamiltonian_b : openmm.System or EnergyModel
        At least one must be a System (it gives masses and constraints). For
        learned -> classical, ``a`` is the model and ``b`` the amber System; then
        ``Delta F = -ln(Z_classical / Z_learned)`` with
        ``Z_learned = int exp(-E_theta(x / s, t_min)) dx``.
    positions : array-like or Quantity, shape (N, 3)
        Start structure of every state, nm.
    lambdas : array-like, shape (K,), optional
        Default ``linspace(0, 1, 6)``.
    temperature : Quantity or float
        Kelvin.
    n_frames : int
        Frames per state.
    save_interval, timestep, equilibration : Quantity or float
        Picoseconds (defaults 0.1 ps, 1 fs, 1 ps).
    friction : Quantity or float
        1/ps.
    platform, backend : str
    subsample : bool
        Decorrelate each state's frames (see :func:`free_energy_from_energies`).
    seed : int
    progress : bool

    Returns
    -------
    FreeEnergyDifference
    """
    systems = [h for h in (hamiltonian_a, hamiltonian_b) if isinstance(h, openmm.System)]
    if not systems:
        raise ValueError("at least one Hamiltonian must be an openmm.System")
    base = systems[0]
    n = base.getNumParticles()
    for h in (hamiltonian_a, hamiltonian_b):
        if isinstance(h, openmm.System):
            if h.getNumParticles() != n:
                raise ValueError("the two Systems have different particle counts")
        else:
            _check_model_system(h, base)
    _check_global_parameters(hamiltonian_a, hamiltonian_b)
    lam = _lambdas(np.linspace(0.0, 1.0, 6) if lambdas is None else lambdas)
    t, dt, fr, steps, equil = _md_settings(temperature, timestep, friction, save_interval,
                                           n_frames, equilibration)
    start = _positions(positions, n, "positions")[0]
    frames, states, status = [], [], []
    t0 = time.perf_counter()
    system = _particle_system(base)
    system.addForce(_hamiltonian_force(hamiltonian_a, f"1 - {LAMBDA_STATE}", t, backend))
    system.addForce(_hamiltonian_force(hamiltonian_b, LAMBDA_STATE, t, backend))
    ctx, integ = _langevin_context(system, t, dt, fr, platform, seed)
    for k, lk in enumerate(tqdm(lam, desc="lambda states", disable=not progress)):
        ctx.setParameter(LAMBDA_STATE, float(lk))
        x, stopped = _run_frames(ctx, integ, start, t, int(n_frames), steps, equil,
                                 seed + k, False, f"lambda {lk:.2f}")
        if stopped:
            warnings.warn(f"lambda state {k} ({lk:.3f}) stopped: {stopped}", RuntimeWarning)
        status.append({"lambda": float(lk), "frames": len(x), "stopped": stopped})
        frames.append(x)
        states.append(np.full(len(x), k))
    del ctx, integ
    md_seconds = time.perf_counter() - t0
    xyz = np.concatenate(frames)
    state = np.concatenate(states).astype(int)
    ua, ub = _Evaluator(hamiltonian_a, t, platform)(xyz), _Evaluator(hamiltonian_b, t,
                                                                       platform)(xyz)
    ok = np.isfinite(ua) & np.isfinite(ub)
    res = free_energy_from_energies(ua[ok], ub[ok], state[ok], lam, t, subsample)
    res.info.update(states=status, n_nonfinite_energy=int((~ok).sum()),
                    md_seconds=md_seconds, seconds=time.perf_counter() - t0,
                    frames_per_state=int(n_frames), save_interval_ps=steps * dt)
    return res
