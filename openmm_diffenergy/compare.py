"""Learned energies against a classical force field on a set of structures.

For an all-atom model of a molecule in vacuum trained on Boltzmann samples at
temperature T, ``E_theta(x, t_min) = u(x)/kT + const`` if the model is exact, so the
learned energy regressed on the reduced classical energy should have slope 1 (kT per kT)
and rank structures as the force field does. This module reports Pearson and Spearman
correlations and that slope for the learned energy ``E_theta(x, t_min)`` and for the
probability-flow ``-log p_0`` (Chen, Chu, Gray et al. 2025), the energy-funnel data
(energy against RMSD to a reference structure, mdtraj RMSD after optimal
superposition), and decoy ranking: does the lowest learned energy pick the structure
closest to the reference?
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import openmm

from .openmm_force import kt_kj_per_mol
from .reweighting import _check_model_system, _default_temperature, _positions, \
    _vector, model_energies, potential_energies

__all__ = ["correlation", "rmsd_to_reference", "decoy_ranking", "EnergyComparison",
           "compare_energies"]


def correlation(learned, classical) -> dict:
    """Correlation of a learned energy with a classical one, and the fitted slope.

    The learned energy is regressed on the classical one (ordinary least squares,
    ``learned = intercept + slope * classical``); with both in kT a perfect model of
    the classical Boltzmann density has ``slope = 1``. Pairs where either value is
    infinite (e.g. overlapping atoms) are left out (``n_used``); NaN raises.

    Parameters
    ----------
    learned : array-like, shape (n,)
        E.g. ``E_theta(x, t_min)`` or ``-log p_0`` (kT).
    classical : array-like, shape (n,)
        E.g. ``u(x) / kT``.

    Returns
    -------
    dict
        ``pearson``, ``spearman``, ``slope`` (kT/kT), ``slope_stderr``, ``intercept``,
        ``n``, ``n_used``.
    """
    from scipy import stats

    y = _vector(learned, "learned")
    x = _vector(classical, "classical")
    if x.shape != y.shape:
        raise ValueError(f"learned ({y.size}) and classical ({x.size}) differ in length")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        raise ValueError(f"need at least 3 finite pairs, got {int(ok.sum())}")
    x, y = x[ok], y[ok]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("an energy is constant over the structures; correlation undefined")
    fit = stats.linregress(x, y)
    return {"pearson": float(stats.pearsonr(x, y)[0]),
            "spearman": float(stats.spearmanr(x, y)[0]),
            "slope": float(fit.slope), "slope_stderr": float(fit.stderr),
            "intercept": float(fit.intercept), "n": int(ok.size), "n_used": int(ok.sum())}


def rmsd_to_reference(xyz, reference, atom_indices=None) -> np.ndarray:
    """RMSD (nm) of every frame to a reference structure after optimal superposition.

    Parameters
    ----------
    xyz : array-like, shape (F, N, 3), nm
    reference : array-like, shape (N, 3), nm
    atom_indices : array-like of int, optional
        Atoms used for superposition and RMSD (e.g. heavy atoms); all by default.

    Returns
    -------
    numpy.ndarray, shape (F,)
    """
    import mdtraj

    arr = _positions(xyz, name="xyz").astype(np.float32)
    ref = _positions(reference, arr.shape[1], "reference").astype(np.float32)
    if len(ref) != 1:
        raise ValueError("reference must be one structure, shape (N, 3)")
    idx = None if atom_indices is None else np.asarray(atom_indices, dtype=int)
    if idx is not None and (idx.min() < 0 or idx.max() >= arr.shape[1]):
        raise ValueError("atom_indices out of range")
    return mdtraj.rmsd(mdtraj.Trajectory(arr, None), mdtraj.Trajectory(ref, None), 0,
                       atom_indices=idx).astype(np.float64)


def decoy_ranking(energy, rmsd) -> dict:
    """Does the lowest energy pick the structure closest to the reference?

    Parameters
    ----------
    energy : array-like, shape (n,)
        Any energy (non-finite values rank last).
    rmsd : array-like, shape (n,)
        RMSD to the reference structure (nm).

    Returns
    -------
    dict
        ``best_index`` (lowest energy), ``rmsd_of_best`` (nm), ``min_rmsd`` (nm),
        ``picks_lowest_rmsd`` (bool), ``rmsd_rank_of_best`` (1 = the lowest RMSD of
        all), and ``spearman_energy_rmsd`` (the funnel's rank correlation).
    """
    from scipy import stats

    e = _vector(energy, "energy")
    r = _vector(rmsd, "rmsd")
    if e.shape != r.shape:
        raise ValueError(f"energy ({e.size}) and rmsd ({r.size}) differ in length")
    e_rank = np.where(np.isfinite(e), e, np.inf)
    best = int(np.argmin(e_rank))
    ok = np.isfinite(e) & np.isfinite(r)
    rho = float(stats.spearmanr(e[ok], r[ok])[0]) if ok.sum() >= 3 else float("nan")
    return {"best_index": best, "rmsd_of_best": float(r[best]), "min_rmsd": float(r.min()),
            "picks_lowest_rmsd": bool(r[best] <= r.min()),
            "rmsd_rank_of_best": int((r < r[best]).sum() + 1),
            "spearman_energy_rmsd": rho}


@dataclass
class EnergyComparison:
    """Learned vs classical energies on a set of structures.

    Attributes
    ----------
    learned_kt : numpy.ndarray, shape (n,)
        ``E_theta(x, t_min)``, kT.
    classical_kj_per_mol : numpy.ndarray, shape (n,)
    reduced_classical : numpy.ndarray, shape (n,)
        ``u / kT``.
    nll : numpy.ndarray, shape (n,) or None
        Probability-flow ``-log p_0`` in model coordinates (nats = kT).
    rmsd_nm : numpy.ndarray, shape (n,) or None
    learned_vs_classical, nll_vs_classical : dict
        :func:`correlation` results (``nll_vs_classical`` empty without ``nll``).
    ranking : dict of str -> dict
        :func:`decoy_ranking` for "learned", "nll" and "classical" (with a reference).
    kt_kj_per_mol : float
    info : dict
    """

    learned_kt: np.ndarray
    classical_kj_per_mol: np.ndarray
    reduced_classical: np.ndarray
    nll: np.ndarray | None
    rmsd_nm: np.ndarray | None
    learned_vs_classical: dict
    nll_vs_classical: dict = field(default_factory=dict)
    ranking: dict = field(default_factory=dict)
    kt_kj_per_mol: float = float("nan")
    info: dict = field(default_factory=dict)


def compare_energies(model, system: openmm.System, xyz, temperature=None, reference=None,
                     atom_indices=None, nll: bool = False, nll_options: dict | None = None,
                     platform: str = "Reference", progress: bool = False) -> EnergyComparison:
    """Compare ``E_theta(x, t_min)`` (and optionally ``-log p_0``) with ``u(x)``.

    Parameters
    ----------
    model : EnergyModel
        Acts on all the System's atoms.
    system : openmm.System
        The classical force field.
    xyz : array-like, shape (n, N, 3), nm
        Structures (equilibrium frames, decoys, ...).
    temperature : Quantity or float, optional
        Kelvin; default the model's training temperature or 300 K.
    reference : array-like, shape (N, 3), optional
        Reference (native) structure for RMSD, funnels and decoy ranking.
    atom_indices : array-like of int, optional
        Atoms for the RMSD (e.g. heavy atoms).
    nll : bool
        Also compute the probability-flow ``-log p_0`` (exact divergence; costly).
    nll_options : dict, optional
        Passed to :func:`openmm_diffenergy.nll`; default adaptive dopri5 with
        ``rtol = atol = 1e-5`` and batches of 32. Structures whose fixed-step solve
        fails (NaN ``-log p0``, e.g. RK4 on a badly strained decoy) are counted in
        ``info["nll_failed"]``, left out of ``nll_vs_classical`` (empty if fewer than 3
        remain) and rank last.
    platform : str
    progress : bool

    Returns
    -------
    EnergyComparison

    Raises
    ------
    RuntimeError
        If the ``-log p0`` solve fails (non-finite score along the flow).
    """
    import torch

    from .likelihood import nll as flow_nll

    temperature = _default_temperature(model, temperature)
    _check_model_system(model, system)
    arr = _positions(xyz, system.getNumParticles(), "xyz")
    if len(arr) < 3:
        raise ValueError("need at least 3 structures to compare energies")
    kt = kt_kj_per_mol(temperature)
    start = time.perf_counter()
    learned = model_energies(model, arr)
    classical = potential_energies(system, arr, platform, progress=progress)
    reduced = classical / kt
    out = EnergyComparison(learned, classical, reduced, None, None,
                           correlation(learned, reduced), kt_kj_per_mol=kt,
                           info={"n": int(len(arr)), "temperature_K": temperature,
                                 "regression": "learned (kT) on classical u/kT (OLS)"})
    if nll:
        opts = {"path": "flow", "divergence": "exact", "solver": "dopri5", "rtol": 1e-5,
                "atol": 1e-5, "batch_size": 32, "progress": progress}
        opts.update(nll_options or {})
        dtype = next((p.dtype for p in model.parameters()), torch.float64)
        try:
            res = flow_nll(model, None, torch.as_tensor(arr, dtype=dtype), **opts)
        except AssertionError as err:        # torchdiffeq: step underflow, non-finite state
            raise RuntimeError(f"the flow-ODE -log p0 failed ({str(err)[:100]}); the "
                               "model's score is probably not finite on these "
                               "structures") from None
        out.nll = res.nll_model.detach().to(torch.float64).numpy()
        solved = np.isfinite(out.nll)
        out.info["nll_failed"] = int((~solved).sum())
        if solved.sum() >= 3:
            out.nll_vs_classical = correlation(out.nll[solved], reduced[solved])
        out.info["nll_method"] = {k: v for k, v in res.method.items()}
    if reference is not None:
        out.rmsd_nm = rmsd_to_reference(arr, reference, atom_indices)
        out.ranking["learned"] = decoy_ranking(learned, out.rmsd_nm)
        out.ranking["classical"] = decoy_ranking(reduced, out.rmsd_nm)
        if out.nll is not None:
            out.ranking["nll"] = decoy_ranking(np.where(np.isfinite(out.nll), out.nll,
                                                        np.inf), out.rmsd_nm)
    out.info["seconds"] = time.perf_counter() - start
    return out
