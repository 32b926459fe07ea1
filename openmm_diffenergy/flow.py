"""Exact flow-ODE likelihoods for importance weights: sampling, densities, mirror folding.

``log q`` of i.i.d. samples must be the density of the sampler itself, so
:func:`sample_with_likelihood` integrates the probability-flow ODE
``dy/dt = f - g^2 s / 2`` from the prior to ``t_min`` with the exact divergence, carrying
``log q`` along each sample's own path. :func:`flow_log_density` integrates the same ODE
the other way, from given structures to the prior, on the same time grid, so the two
give the same ``log q`` up to the solver's error.

:func:`mirror_fold` turns a sampler into one of a single enantiomer. Reflect every sample
that lies outside a region (e.g. L-chirality) through the xy-plane; if the reflection
``R`` maps the outside onto the inside, the folded samples have the exact density
``q_fold(x) = q(x) + q(Rx)`` inside (``|det R| = 1``), which needs one more likelihood per
sample (:func:`folded_log_density`).

:func:`denoise` takes samples of ``q_{t_min}`` one step of the same ODE on to ``t = 0``
(score frozen at ``t_min``), with the exact log-determinant of that step. Noise of
``sigma(t_min)`` per coordinate widens the stiffest modes (bonds) by a factor 2 or more;
the step removes most of it while the densities stay exact, which is what importance
weights against a classical force field need.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .coordinates import centre, subspace_basis
from .divergence import get_estimator
from .likelihood import SampleResult
from .models.base import model_dtype, score_fn

__all__ = ["sample_with_likelihood", "flow_log_density", "mirror_fold",
           "folded_log_density", "denoise", "MIRROR"]

MIRROR = (1.0, 1.0, -1.0)
"""The reflection used by :func:`mirror_fold`: ``z -> -z``."""

FIXED_SOLVERS = ("rk4", "midpoint", "euler", "explicit_adams", "implicit_adams")


def _check_positive_int(value, name):
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


class _FlowSolver:
    """The probability-flow ODE with its exact divergence, solved batch by batch.

    A batch the solver fails on (step-size underflow, non-finite values) is split in
    halves until the failing samples are alone; those come back as NaN and the reasons
    are kept in ``failures``.
    """

    def __init__(self, model, sde, t_min, solver, rtol, atol, steps, divergence, seed, dtype):
        try:
            from torchdiffeq import odeint
        except ImportError as err:  # pragma: no cover - a pinned dependency
            raise ImportError("flow likelihoods need torchdiffeq: pip install "
                              "torchdiffeq") from err
        self.odeint = odeint
        self.model, self.sde = model, sde
        self.t_min = float(model.t_min if t_min is None else t_min)
        if not 0.0 <= self.t_min < sde.T:
            raise ValueError(f"t_min must lie in [0, {sde.T}), got {self.t_min}")
        _check_positive_int(steps, "steps")
        self.solver, self.rtol, self.atol, self.steps = solver, rtol, atol, int(steps)
        self.fixed = solver in FIXED_SOLVERS
        self.dtype = dtype
        self.score = score_fn(model)
        self.estimator = get_estimator(divergence, 1, "rademacher", seed)
        self.nfe = 0
        self.failures = []

    def times(self, forward: bool) -> torch.Tensor:
        """Time grid: ``t_min + (T - t_min) u^3`` with ``u`` uniform for fixed-step
        solvers (fine near ``t_min``), the two end points for adaptive ones."""
        if self.fixed:
            u = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64) ** 3
            ts = self.t_min + (self.sde.T - self.t_min) * u
        else:
            ts = torch.tensor([self.t_min, self.sde.T], dtype=torch.float64)
        return (ts if forward else ts.flip(0)).to(self.dtype)

    def _rhs(self, t, state):
        y = state[0]
        self.nfe += 1
        s, div = self.estimator(self.score, y, torch.full((y.shape[0],), float(t),
                                                          dtype=y.dtype))
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, g2 = float(self.sde.drift_coeff(tt)), float(self.sde.g2(tt))
        return a * y - 0.5 * g2 * s, a * self.model.dof - 0.5 * g2 * div

    def solve(self, y, ts):
        """``(y(ts[-1]), delta)`` with ``delta = int div(flow) dt`` along the path."""
        self.estimator.reset()
        try:
            with torch.no_grad():
                ys, deltas = self.odeint(self._rhs, (y, torch.zeros(y.shape[0], dtype=y.dtype)),
                                         ts, method=self.solver,
                                         **({} if self.fixed else {"rtol": self.rtol,
                                                                   "atol": self.atol}))
            if torch.isfinite(ys[-1]).all() and torch.isfinite(deltas[-1]).all():
                return ys[-1], deltas[-1]
            reason = "non-finite result"
        except (AssertionError, RuntimeError) as err:   # torchdiffeq: step-size underflow
            reason = f"{type(err).__name__}: {str(err)[:120]}"
        if y.shape[0] == 1:
            self.failures.append(reason)
            return torch.full_like(y, float("nan")), torch.full((1,), float("nan"),
                                                                dtype=y.dtype)
        half = y.shape[0] // 2
        (ya, da), (yb, db) = self.solve(y[:half], ts), self.solve(y[half:], ts)
        return torch.cat([ya, yb]), torch.cat([da, db])

    def info(self, n_batches: int, start: float, seed) -> dict:
        out = {"method": "ode", "solver": self.solver, "t_min": self.t_min, "T": self.sde.T,
               "dof": self.model.dof, "length_scale": self.model.length_scale, "seed": seed,
               "nfe": self.nfe / max(n_batches, 1), "nfe_total": self.nfe,
               "failed": len(self.failures), "failures": self.failures[:10],
               "seconds": time.perf_counter() - start, "dtype": str(self.dtype)}
        out.update({"steps": self.steps, "grid": "cubic"} if self.fixed
                   else {"rtol": self.rtol, "atol": self.atol})
        describe = getattr(self.estimator, "describe", None)
        out.update(describe() if describe else {"estimator": type(self.estimator).__name__})
        return out


def _batches(n: int, batch_size: int) -> list:
    _check_positive_int(batch_size, "batch_size")
    return [min(int(batch_size), int(n) - i) for i in range(0, int(n), int(batch_size))]


def sample_with_likelihood(model, n: int, sde=None, t_min: float | None = None,
                           solver: str = "dopri5", rtol: float = 1e-7, atol: float = 1e-7,
                           steps: int = 200, divergence="exact", batch_size: int = 32,
                           seed: int | None = 0, dtype: torch.dtype | None = None,
                           progress: bool = False) -> SampleResult:
    """Draw samples with the probability-flow ODE and their exact ``log q`` on the way.

    Each sample starts from the prior at ``T`` and the flow ``dy/dt = f - g^2 s / 2`` is
    integrated to ``t_min`` together with ``d delta / dt = div(f - g^2 s / 2)``, so that
    ``log q(y) = log p_T(y_T) - delta``: the density of the sampler itself, as
    importance weights need.

    Parameters
    ----------
    model : EnergyModel
    n : int
        Number of samples.
    sde : LinearSDE, optional
        Default ``model.sde``.
    t_min : float, optional
        Default ``model.t_min``.
    solver : str
        A torchdiffeq method. Adaptive ones ("dopri5", "bosh3", ...) use ``rtol`` and
        ``atol`` (model coordinates; the step is shared by a batch, whose error norm
        averages over samples: at 1e-5, 3 of 16 all-atom samples had ``log q`` 4-82
        nats off, at the default 1e-7 none more than 0.34); fixed-grid ones
        ("rk4", "midpoint", "euler") take ``steps`` steps on the grid
        ``t_min + (T - t_min) u^3``, ``u`` uniform, which is fine near ``t_min``.
    divergence : {"exact"} or estimator
        Anything :func:`openmm_diffenergy.divergence.get_estimator` accepts. Stochastic
        estimators make ``exp(log w)`` biased; keep "exact" for reweighting.
    batch_size : int
    seed : int, optional
        Seeds the prior draws.
    dtype : torch.dtype, optional
        Default: the model's parameter dtype. The model computes in its own dtype, so for
        float64 likelihoods pass a float64 model (``model.double()``).
    progress : bool

    Returns
    -------
    SampleResult
        ``x`` (n, N, 3) nm (or (n, d)); ``nll = -log q`` per nm^D and ``nll_model``
        in model coordinates; ``method`` with the solver, tolerances, mean ``nfe`` and
        ``failed``: samples whose solve failed (step-size underflow or non-finite
        values; the batch is split to isolate them). Those come back as NaN; dropping
        them biases the weights toward well-behaved samples, so report the count.
    """
    sde = model.sde if sde is None else sde
    _check_positive_int(n, "n")
    sizes = _batches(n, batch_size)
    dtype = model_dtype(model) if dtype is None else dtype
    flow = _FlowSolver(model, sde, t_min, solver, rtol, atol, steps, divergence, seed, dtype)
    ts = flow.times(forward=False)
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    start = time.perf_counter()
    xs, nlls = [], []
    for size in tqdm(sizes, desc="ODE samples + log q", disable=not progress):
        y = sde.prior_sample(size, model.dim, model.n_particles, gen, dtype)
        log_prior = sde.prior_log_prob(y, model.dof, model.n_particles)
        y_end, delta = flow.solve(y, ts)
        xs.append(centre(y_end, model.n_particles) * model.length_scale)
        nlls.append(-(log_prior - delta))
    x = torch.cat(xs)
    if model.n_particles is not None:
        x = x.reshape(-1, model.n_particles, 3)
    nll_model = torch.cat(nlls).to(torch.float64)
    info = flow.info(len(sizes), start, seed)
    info["batch_size"] = int(batch_size)
    return SampleResult(x, nll_model + model.dof * math.log(model.length_scale), nll_model,
                        info)


def flow_log_density(model, x, sde=None, t_min: float | None = None, solver: str = "dopri5",
                     rtol: float = 1e-7, atol: float = 1e-7, steps: int = 200,
                     divergence="exact", batch_size: int = 32, seed: int | None = 0,
                     dtype: torch.dtype | None = None, progress: bool = False) -> SampleResult:
    """``-log q(x)`` of given structures under :func:`sample_with_likelihood`'s sampler.

    The flow ODE is integrated from ``t_min`` to ``T`` on the reversed time grid of the
    sampler with the same settings, ``log q(x) = log p_T(y_T) + delta``. Structures whose
    solve fails come back with NaN (counted in ``method["failed"]``).

    Parameters
    ----------
    model : EnergyModel
    x : array-like or torch.Tensor, shape (n, N, 3), (n, 3N) or (n, d)
        Positions in nm.
    sde, t_min, solver, rtol, atol, steps, divergence, batch_size, seed, dtype, progress
        As in :func:`sample_with_likelihood`.

    Returns
    -------
    SampleResult
        ``x`` as given (a tensor, nm); ``nll`` per nm^D and ``nll_model``.
    """
    sde = model.sde if sde is None else sde
    dtype = model_dtype(model) if dtype is None else dtype
    x = torch.as_tensor(x).to(dtype)
    if x.shape[0] < 1:
        raise ValueError("x holds no structures")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or inf positions")
    y_all = centre(model.to_model_coordinates(x), model.n_particles).to(dtype)
    batches = torch.split(y_all, _batches(y_all.shape[0], batch_size))
    flow = _FlowSolver(model, sde, t_min, solver, rtol, atol, steps, divergence, seed, dtype)
    ts = flow.times(forward=True)
    start = time.perf_counter()
    nlls = []
    for y0 in tqdm(batches, desc="flow log q", disable=not progress):
        y_t, delta = flow.solve(y0, ts)
        nlls.append(-(sde.prior_log_prob(y_t, model.dof, model.n_particles) + delta))
    nll_model = torch.cat(nlls).to(torch.float64)
    info = flow.info(len(batches), start, seed)
    info["batch_size"] = int(batch_size)
    return SampleResult(x, nll_model + model.dof * math.log(model.length_scale), nll_model,
                        info)


def mirror_fold(x, condition):
    """Reflect the structures outside ``condition`` through the xy-plane.

    Parameters
    ----------
    x : array-like, shape (n, N, 3) or (n, 3)
        Positions, nm.
    condition : callable
        ``condition(x) -> bool array (n,)``, e.g. L-chirality. Its reflection must map
        the outside onto the inside (true for one stereocentre).

    Returns
    -------
    folded : numpy.ndarray, shape of ``x``
    mirrored : numpy.ndarray of bool, shape (n,)
        Which structures were reflected.

    Raises
    ------
    ValueError
        If a reflected structure is still outside ``condition``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(f"x must have shape (n, N, 3) or (n, 3), got {x.shape}")
    inside = np.asarray(condition(x), dtype=bool).reshape(-1)
    if inside.shape != (x.shape[0],):
        raise ValueError(f"condition returned {inside.size} values for {x.shape[0]} samples")
    mask = inside.reshape((-1,) + (1,) * (x.ndim - 1))
    folded = np.where(mask, x, x * np.asarray(MIRROR))
    if not np.asarray(condition(folded), dtype=bool).all():
        raise ValueError("a reflected structure is still outside the condition; mirror "
                         "folding needs a condition that the reflection maps onto its "
                         "complement (e.g. the chirality of one stereocentre)")
    return folded, ~inside


def folded_log_density(model, x, nll, **kwargs):
    """``-log q_fold`` of mirror-folded samples, ``q_fold(z) = q(z) + q(Rz)``.

    A folded sample ``z`` is either the drawn ``x`` or its reflection ``Rx``; in both cases
    the density still missing is ``q(Rx)``, so one likelihood solve on ``Rx`` per sample.

    Parameters
    ----------
    model : EnergyModel
    x : array-like, shape (n, N, 3)
        The samples as drawn (before folding), nm.
    nll : array-like, shape (n,)
        Their ``-log q(x)`` per nm^D, from :func:`sample_with_likelihood`.
    **kwargs
        Settings of :func:`flow_log_density`; use the sampler's.

    Returns
    -------
    nll_fold : numpy.ndarray, shape (n,)
        ``-log q_fold`` per nm^D, NaN where the solve failed.
    info : dict
        The solve's ``method``.
    """
    x = np.asarray(x, dtype=np.float64)
    res = flow_log_density(model, x * np.asarray(MIRROR), **kwargs)
    other = res.nll.detach().numpy().astype(np.float64)
    return -np.logaddexp(-np.asarray(nll, dtype=np.float64), -other), res.method


def _frozen_score_coefficient(sde, t: float, points: int = 2001) -> float:
    """``c(t) = int_0^t g(u)^2 / (2 alpha(u)) du`` (trapezoid rule, float64)."""
    u = torch.linspace(0.0, t, points, dtype=torch.float64)
    return float(torch.trapezoid(0.5 * sde.g2(u) / sde.alpha(u), u))


def denoise(model, x, t: float | None = None, sde=None, batch_size: int = 64,
            dtype: torch.dtype | None = None):
    """One step of the probability-flow ODE from ``t`` to 0, with its exact log-Jacobian.

    The ODE ``dy/du = f(u) y - g(u)^2 s(y, u) / 2`` is integrated exactly from ``t`` back to
    0 with the score frozen at ``s_theta(y, t)`` (an exponential-integrator step): in model
    coordinates ``y = x / s`` (centroid removed)
    ``y0 = y / alpha(t) + c(t) s_theta(y, t)``, ``c(t) = int_0^t g^2 / (2 alpha) du``
    (``(1 - alpha) / alpha ~ sigma^2 / 2`` for the VP SDE). It is a deterministic map, so
    samples of a density ``q`` (``exp(-E(., t))`` for MD with the learned force, or the
    flow sampler's ``q``) become samples of ``q0(y0) = q(y) / |det J(y)|`` with
    ``J = I / alpha - c Hess E``; importance weights stay exact when ``-log q`` gains
    ``log det J``. For a Gaussian density of variance ``a + sigma^2`` along a mode, the
    step leaves about ``a + sigma^4 / 4(a + sigma^2)``: most of the ``t_min`` noise is
    gone. ``J`` is taken exactly (one backward pass per coordinate), on the
    centroid-free subspace for particle models.

    Parameters
    ----------
    model : EnergyModel
    x : array-like or torch.Tensor, shape (n, N, 3), (n, 3N) or (n, d)
        Positions in nm (samples at time ``t``).
    t : float, optional
        Start time; default ``model.t_min``.
    sde : LinearSDE, optional
        Default ``model.sde``.
    batch_size : int
    dtype : torch.dtype, optional
        Compute in this dtype (default the model's; the model is not copied, so give a
        model of that dtype).

    Returns
    -------
    x0 : numpy.ndarray, shape of ``x``
        Denoised positions, nm (particle centroids are kept).
    logdet : numpy.ndarray, shape (n,)
        ``log det J``, so that ``-log q0(x0) = -log q(x) + logdet``. NaN where ``J`` is
        not positive definite (the step is not locally invertible there: an energy
        curvature above ``1 / (alpha c)`` in model units, steeper than any density
        diffused to ``t`` can be).
    """
    sde = model.sde if sde is None else sde
    t = float(model.t_min if t is None else t)
    if not t > 0:
        raise ValueError(f"t must be positive, got {t}")
    _check_positive_int(batch_size, "batch_size")
    dtype = model_dtype(model) if dtype is None else dtype
    x = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype)
    if x.shape[0] < 1:
        raise ValueError("x holds no structures")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or inf positions")
    y_raw = model.to_model_coordinates(x).to(dtype)
    y_all = centre(y_raw, model.n_particles)
    offset = y_raw - y_all
    dim = y_all.shape[1]
    if model.n_particles is None:
        basis = torch.eye(dim, dtype=dtype)
    else:
        basis = torch.kron(subspace_basis(model.n_particles), torch.eye(3, dtype=torch.float64)
                           ).to(dtype)
    tt = torch.tensor([t], dtype=dtype)
    inv_alpha = 1.0 / float(sde.alpha(tt.to(torch.float64)))
    c = _frozen_score_coefficient(sde, t)
    y0s, logdets = [], []
    for y in torch.split(y_all, int(batch_size)):
        y = y.detach().requires_grad_(True)
        with torch.enable_grad():
            e = model(y, tt.expand(y.shape[0]))
            (grad,) = torch.autograd.grad(e.sum(), y, create_graph=True)
            hess = torch.stack([torch.autograd.grad(grad[:, i].sum(), y, retain_graph=True)[0]
                                for i in range(dim)], dim=1)
        grad, hess = grad.detach(), hess.detach()
        y0s.append(inv_alpha * y.detach() - c * grad)
        jac = inv_alpha * torch.eye(dim, dtype=dtype) - c * hess
        eig = torch.linalg.eigvalsh(basis.T @ jac @ basis)
        logdet = eig.clamp_min(torch.finfo(dtype).tiny).log().sum(-1)
        logdets.append(torch.where(eig.min(-1).values > 0, logdet,
                                   torch.full_like(logdet, float("nan"))))
    y0 = torch.cat(y0s) + offset
    x0 = (y0 * model.length_scale).reshape(x.shape)
    return (x0.to(torch.float64).numpy(), torch.cat(logdets).to(torch.float64).numpy())
