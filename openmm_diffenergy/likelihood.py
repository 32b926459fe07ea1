"""Likelihoods ``-log p_0(x_0)`` along the probability-flow ODE and along diffusion paths.

All integrals run in model coordinates ``y = centre(x) / s`` (``s`` the model's length
scale, nm). Results are reported both ways: ``nll_model = -log p~(y)`` and
``nll = -log p(x) = nll_model + D log s`` (a density per nm^D for particle systems).

Probability-flow ODE::

    dy/dt = f - 1/2 g^2 s,    log p_0(y_0) = log p_T(y_T) + int div(f - 1/2 g^2 s) dt

Diffusion path (Chen, Chu, Gray et al. 2025). Along any path ``y_t`` the chain rule of
``log p_t`` holds in Stratonovich form, ``d log p_t = d_t log p_t dt + s o dy``, with
``d_t log p`` from the Fokker-Planck equation,
``d_t log p = -div f - f.s + 1/2 g^2 (div s + |s|^2)``. A discrete path is joined by
straight segments in (t, y); on each segment the differential is exact, so a quadrature
rule on it is the only error, whatever generated the path. Schemes:

- ``"simpson"`` (default): Simpson's rule, one extra evaluation at each segment's
  midpoint; error O(|dy|^5) per step.
- ``"trapezoid"``: the trapezoidal rule; O(|dy|^3) per step, first order overall.
- ``"ito"``: the equivalent Ito form ``(d_t log p + 1/2 g_path^2 div s) dt + s . dy``
  at the start of each step (DESIGN.md section 4); O(sqrt(dt)) per path.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .coordinates import centre, subspace_noise
from .divergence import get_estimator
from .mcmc import check_settings, mala_model_coordinates
from .models.base import score_fn

__all__ = ["NLLResult", "SampleResult", "nll", "path_nll", "sample", "time_grid"]


SCHEMES = ("simpson", "trapezoid", "ito")


@dataclass
class NLLResult:
    """Per-sample negative log-likelihoods and how they were computed.

    Attributes
    ----------
    nll : torch.Tensor, shape (B,)
        ``-log p_{t_min}(x)`` in nats, density of positions (per nm^D).
    nll_model : torch.Tensor, shape (B,)
        The same in model coordinates (``x / s``, dimensionless); equals the learned
        energy ``E(x, t_min)`` up to a constant for a perfect energy model.
    log_prior : torch.Tensor, shape (B,)
        ``log p_T`` at the path's end in model coordinates.
    method : dict
        path, solver/scheme, steps, ``nfe`` (score/divergence evaluations each sample
        saw; ``nfe_total`` over all chunks), estimator, t_min, T, D, length scale and
        wall time.
    """

    nll: torch.Tensor
    nll_model: torch.Tensor
    log_prior: torch.Tensor
    method: dict = field(default_factory=dict)


@dataclass
class SampleResult:
    """Samples drawn by integrating from the prior, with their likelihood.

    Attributes
    ----------
    x : torch.Tensor, shape (n, N, 3) or (n, d)
        Samples in nm (centred for particle systems).
    nll : torch.Tensor, shape (n,) or None
        ``-log p_{t_min}(x)`` per nm^D computed along each sample's own path.
    nll_model : torch.Tensor, shape (n,) or None
    method : dict
    """

    x: torch.Tensor
    nll: torch.Tensor | None
    nll_model: torch.Tensor | None
    method: dict = field(default_factory=dict)


class _Field:
    """Score, divergence and time derivative of log p for one model at one batch."""

    def __init__(self, model, sde, estimator):
        self.model, self.sde, self.estimator = model, sde, estimator
        self.score = score_fn(model)
        self.dof = model.dof
        self.nfe = 0

    def score_div(self, y, t: float):
        self.nfe += 1
        tb = torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device)
        return self.estimator(self.score, y, tb)

    def flow(self, t: float, y):
        """Probability-flow velocity and its divergence at time ``t``."""
        s, div = self.score_div(y, t)
        tt = torch.tensor(t, dtype=torch.float64)
        a, g2 = float(self.sde.drift_coeff(tt)), float(self.sde.g2(tt))
        return a * y - 0.5 * g2 * s, a * self.dof - 0.5 * g2 * div

    def point(self, t: float, y):
        """Everything a diffusion-path step needs at ``(t, y)``."""
        s, div = self.score_div(y, t)
        tt = torch.tensor(t, dtype=torch.float64)
        a, g2 = float(self.sde.drift_coeff(tt)), float(self.sde.g2(tt))
        dt_logp = -a * self.dof - a * (y * s).sum(-1) + 0.5 * g2 * (div + (s * s).sum(-1))
        return {"t": t, "y": y, "s": s, "div": div, "dt_logp": dt_logp}


class _ScoreOnly:
    """Estimator stand-in for sampling without likelihoods: the field, no divergence."""

    def reset(self):
        pass

    def __call__(self, fn, y, t):
        return fn(y, t), torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)


def _increment(field_, p, q, scheme: str, g2_path: float):
    """``log p_{t_q}(y_q) - log p_{t_p}(y_p)`` over one step from point p to point q.

    ``"trapezoid"`` and ``"simpson"`` integrate the exact differential
    ``d log p = d_t log p dt + s . dy`` along the straight segment from p to q with the
    trapezoidal rule or Simpson's rule (one more evaluation, at the segment's midpoint);
    ``"ito"`` is the left-point Ito form with its ``1/2 g_path^2 div s dt`` correction.
    """
    dt = q["t"] - p["t"]
    dy = q["y"] - p["y"]

    def slope(point):
        return (point["s"] * dy).sum(-1) + point["dt_logp"] * dt

    if scheme == "trapezoid":
        return 0.5 * (slope(p) + slope(q))
    if scheme == "simpson":
        m = field_.point(0.5 * (p["t"] + q["t"]), 0.5 * (p["y"] + q["y"]))
        return (slope(p) + 4 * slope(m) + slope(q)) / 6
    return slope(p) + 0.5 * g2_path * abs(dt) * p["div"]


def _check_common(model, sde, t_min, steps, scheme=None):
    for attr in ("dim", "n_particles", "length_scale", "dof"):
        if not hasattr(model, attr):
            raise ValueError(f"model must be an EnergyModel (it lacks {attr!r})")
    if sde is None:
        sde = getattr(model, "sde", None)
        if sde is None:
            raise ValueError("no sde given and the model carries none")
    t_min = float(getattr(model, "t_min", 0.0) if t_min is None else t_min)
    if not 0.0 <= t_min < sde.T:
        raise ValueError(f"t_min must lie in [0, {sde.T}), got {t_min}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return sde, t_min


def _rk4(field_, y, t0: float, t1: float, steps: int, progress: bool, desc: str):
    """Integrate the flow ODE and its divergence from t0 to t1 with classic RK4."""
    h = (t1 - t0) / steps
    delta = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for k in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        t = t0 + k * h
        k1y, k1d = field_.flow(t, y)
        k2y, k2d = field_.flow(t + h / 2, y + h / 2 * k1y)
        k3y, k3d = field_.flow(t + h / 2, y + h / 2 * k2y)
        k4y, k4d = field_.flow(t + h, y + h * k3y)
        y = y + h / 6 * (k1y + 2 * k2y + 2 * k3y + k4y)
        delta = delta + h / 6 * (k1d + 2 * k2d + 2 * k3d + k4d)
    return y, delta


def _adaptive(field_, y, t0: float, t1: float, solver: str, rtol: float, atol: float):
    try:
        from torchdiffeq import odeint
    except ImportError as err:  # pragma: no cover - torchdiffeq is a pinned dependency
        raise ImportError("adaptive solvers need torchdiffeq: pip install torchdiffeq") from err

    def rhs(t, state):
        return field_.flow(float(t), state[0])

    delta0 = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    ts = torch.tensor([t0, t1], dtype=y.dtype, device=y.device)
    ys, deltas = odeint(rhs, (y, delta0), ts, method=solver, rtol=rtol, atol=atol)
    return ys[-1], deltas[-1]


def nll(model, sde, x, path: str = "flow", divergence="exact", steps: int | None = None,
        seed: int | None = None, solver: str = "rk4", n_probes: int = 1,
        probe: str = "rademacher", t_min: float | None = None, scheme: str = "simpson",
        grid_power: float = 2.0, rtol: float = 1e-6, atol: float = 1e-8,
        batch_size: int | None = None, progress: bool = False) -> NLLResult:
    """Per-sample ``-log p_{t_min}(x)`` along the probability-flow ODE or a diffusion path.

    Parameters
    ----------
    model : EnergyModel
    sde : LinearSDE or None
        Noise schedule; ``None`` takes ``model.sde``.
    x : torch.Tensor, shape (B, N, 3), (B, 3N) or (B, d)
        Positions in nm. The dtype of ``x`` is the dtype of the computation.
    path : {"flow", "diffusion"}
        ``"flow"`` integrates the probability-flow ODE. ``"diffusion"`` follows one
        stochastic path of the forward SDE started at ``x`` (in law, the reverse-SDE path
        conditioned to end at ``x``), simulated with exact Gaussian transitions.
    divergence : {"exact", "hutchinson", "fast", "fast-hutchinson"} or estimator
        Divergence estimator (:mod:`openmm_diffenergy.divergence`). ``"fast"`` is exact,
        by forward-Laplacian propagation, for MoleculeEnergy and DistanceMLPEnergy.
    steps : int, optional
        Fixed steps: RK4 steps for the flow (default 100), path steps for the diffusion
        path (default 200). Ignored by adaptive solvers.
    seed : int, optional
        Seeds the Hutchinson probes and the diffusion path's noise.
    solver : {"rk4", "dopri5", "bosh3", "adaptive_heun"}
        Flow solver: fixed-step RK4, or an adaptive torchdiffeq method with ``rtol``/``atol``.
    n_probes, probe
        Hutchinson probes per sample and their distribution ("rademacher", "gaussian").
    t_min : float, optional
        Start time of the integral; default ``model.t_min``.
    scheme : {"simpson", "trapezoid", "ito"}
        Quadrature of the diffusion-path integral (see module docstring).
    grid_power : float
        Diffusion-path time grid ``t_min + (T - t_min) (k / steps)^grid_power``
        (see :func:`time_grid`); 1 is uniform.
    batch_size : int, optional
        Process ``x`` in chunks of this size (each chunk is one solve with its own probes).
    progress : bool
        Show a progress bar.

    Returns
    -------
    NLLResult
    """
    sde, t_min = _check_common(model, sde, t_min, steps, scheme)
    if path not in ("flow", "diffusion"):
        raise ValueError(f"path must be 'flow' or 'diffusion', got {path!r}")
    if path == "flow" and solver not in ("rk4", "dopri5", "bosh3", "adaptive_heun"):
        raise ValueError(f"unknown solver {solver!r}; expected rk4, dopri5, bosh3 or "
                         "adaptive_heun")
    y_all = centre(model.to_model_coordinates(x), model.n_particles)
    estimator = get_estimator(divergence, n_probes, probe, seed)
    steps = int(steps) if steps is not None else (100 if path == "flow" else 200)
    batch_size = y_all.shape[0] if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator(device=y_all.device)
    generator.manual_seed(0 if seed is None else int(seed))

    start = time.perf_counter()
    field_ = _Field(model, sde, estimator)
    out_model, out_prior = [], []
    chunks = list(torch.split(y_all, batch_size))
    with torch.no_grad():
        for i, y0 in enumerate(chunks):
            estimator.reset()
            desc = f"nll {path} {i + 1}/{len(chunks)}"
            if path == "flow":
                if solver == "rk4":
                    y_t, delta = _rk4(field_, y0, t_min, sde.T, steps, progress, desc)
                else:
                    y_t, delta = _adaptive(field_, y0, t_min, sde.T, solver, rtol, atol)
                log_prior = sde.prior_log_prob(y_t, model.dof, model.n_particles)
                log_p = log_prior + delta
            else:
                log_p, log_prior = _forward_path(field_, sde, y0, t_min, steps, scheme,
                                                 generator, model.n_particles, progress, desc,
                                                 grid_power)
            out_model.append(-log_p)
            out_prior.append(log_prior)
    nll_model = torch.cat(out_model)
    method = {"path": path, "steps": steps if (path == "diffusion" or solver == "rk4") else None,
              "nfe": round(field_.nfe / len(chunks)), "nfe_total": field_.nfe,
              "chunks": len(chunks), "t_min": t_min, "T": sde.T,
              "dof": model.dof, "length_scale": model.length_scale,
              "seconds": time.perf_counter() - start, "seed": seed, **_describe(estimator)}
    if path == "flow":
        method["solver"] = solver
        if solver != "rk4":
            method.update(rtol=rtol, atol=atol)
    else:
        method.update(scheme=scheme, grid_power=grid_power)
    return NLLResult(nll_model + model.dof * math.log(model.length_scale), nll_model,
                     torch.cat(out_prior), method)


def _describe(estimator) -> dict:
    describe = getattr(estimator, "describe", None)
    return describe() if describe else {"estimator": type(estimator).__name__}


def time_grid(t_min: float, T: float, steps: int, power: float = 1.0) -> list:
    """Diffusion times ``t_min + (T - t_min) (k / steps)^power``, k = 0..steps.

    ``power > 1`` puts short steps near ``t_min``, where the noise is smallest relative to
    the structure of ``p_t`` and the discretization error of a path step is largest.
    """
    if not power >= 1.0:
        raise ValueError(f"grid power must be >= 1, got {power}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** power
    return (t_min + (T - t_min) * u).tolist()


def _forward_path(field_, sde, y0, t_min, steps, scheme, generator, n_particles, progress, desc,
                  power):
    """Integrate along one forward-SDE path from (t_min, y0) to T."""
    times = time_grid(t_min, sde.T, steps, power)
    p = field_.point(times[0], y0)
    total = torch.zeros_like(p["dt_logp"])
    for k in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        y = sde.transition_sample(p["y"], times[k], times[k + 1], n_particles, generator)
        q = field_.point(times[k + 1], y)
        total = total + _increment(field_, p, q, scheme, float(sde.g2(torch.tensor(times[k]))))
        p = q
    log_prior = sde.prior_log_prob(p["y"], field_.dof, n_particles)
    return log_prior - total, log_prior


def path_nll(model, sde, times, positions, divergence="exact", scheme: str = "simpson",
             path_diffusion=0.0, seed: int | None = None, n_probes: int = 1,
             probe: str = "rademacher", progress: bool = False) -> NLLResult:
    """``-log p`` at the start of a user-given path that reaches ``t = T``.

    Parameters
    ----------
    model : EnergyModel
    sde : LinearSDE or None
    times : array-like, shape (S + 1,)
        Strictly monotone diffusion times; one end must be ``T`` (where ``log p_T`` is
        the prior) and the other end ``t_0`` is where the likelihood is reported.
    positions : torch.Tensor, shape (S + 1, B, N, 3), (S + 1, B, 3N) or (S + 1, B, d)
        The path, in nm, one frame per time.
    divergence : {"exact", "hutchinson", "fast", "fast-hutchinson"} or estimator
    scheme : {"simpson", "trapezoid", "ito"}
        Quadrature on each straight segment of the path (see module docstring).
        ``"ito"`` needs ``path_diffusion``.
    path_diffusion : float or callable
        ``g_path(t)^2``, the quadratic variation of the path per unit time (model
        coordinates); 0 for a smooth path. Used by ``scheme="ito"`` only.

    Returns
    -------
    NLLResult
        Likelihood of ``positions`` at the path's ``t_0`` end.
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.dim() != 1 or times.shape[0] < 2:
        raise ValueError(f"times must have shape (S + 1,) with S >= 1, got {tuple(times.shape)}")
    if not torch.isfinite(times).all():
        raise ValueError("times hold NaN or inf values")
    diffs = times[1:] - times[:-1]
    if not ((diffs > 0).all() or (diffs < 0).all()):
        raise ValueError("times must be strictly increasing or strictly decreasing")
    increasing = bool(diffs[0] > 0)
    t_start = float(times[0] if increasing else times[-1])
    sde, t_start = _check_common(model, sde, t_start, None, scheme)
    t_end = float(times[-1] if increasing else times[0])
    if abs(t_end - sde.T) > 1e-12:
        raise ValueError(f"the path must reach T = {sde.T}; its times end at {t_end}")
    if not isinstance(positions, torch.Tensor) or positions.dim() < 3 \
            or positions.shape[0] != times.shape[0]:
        raise ValueError(f"positions must be a tensor of shape (S + 1, B, ...) with "
                         f"S + 1 = {times.shape[0]} frames")
    g2_of = path_diffusion if callable(path_diffusion) else (lambda t: float(path_diffusion))
    estimator = get_estimator(divergence, n_probes, probe, seed)
    estimator.reset()
    field_ = _Field(model, sde, estimator)
    start = time.perf_counter()
    with torch.no_grad():
        frames = [centre(model.to_model_coordinates(f), model.n_particles) for f in positions]
        tlist = times.tolist()
        p = field_.point(tlist[0], frames[0])
        total = torch.zeros_like(p["dt_logp"])
        for k in tqdm(range(len(frames) - 1), desc="path nll", disable=not progress,
                      leave=False):
            q = field_.point(tlist[k + 1], frames[k + 1])
            total = total + _increment(field_, p, q, scheme, float(g2_of(tlist[k])))
            p = q
        # total = log p(last frame) - log p(first frame)
        if increasing:
            log_prior = sde.prior_log_prob(frames[-1], model.dof, model.n_particles)
            log_p = log_prior - total
        else:
            log_prior = sde.prior_log_prob(frames[0], model.dof, model.n_particles)
            log_p = log_prior + total
    method = {"path": "user", "scheme": scheme, "steps": len(frames) - 1, "nfe": field_.nfe,
              "t_min": t_start, "T": sde.T, "dof": model.dof,
              "length_scale": model.length_scale, "seconds": time.perf_counter() - start,
              **_describe(estimator)}
    return NLLResult(-log_p + model.dof * math.log(model.length_scale), -log_p, log_prior,
                     method)


def sample(model, sde, n: int, method: str = "sde", steps: int | None = None,
           divergence="exact", return_nll: bool = True, seed: int | None = None,
           n_probes: int = 1, probe: str = "rademacher", t_min: float | None = None,
           scheme: str = "simpson", grid_power: float = 2.0, dtype=torch.float64,
           progress: bool = False, corrector_steps: int = 0,
           corrector_step_size: float | None = None) -> SampleResult:
    """Draw samples from the prior to ``t_min`` and, optionally, their likelihood.

    Parameters
    ----------
    model : EnergyModel
    sde : LinearSDE or None
    n : int
        Number of samples.
    method : {"sde", "ode"}
        ``"sde"``: Euler-Maruyama on the reverse-time SDE ``dy = (f - g^2 s) dt + g dW``;
        the likelihood is integrated along each sample's own stochastic path (the
        diffusion-path estimator). ``"ode"``: RK4 on the probability-flow ODE, with the
        flow likelihood.
    steps : int, optional
        Default 1000 for "sde", 100 for "ode".
    divergence, n_probes, probe, scheme, grid_power
        As in :func:`nll`. Without ``return_nll`` the SDE sampler skips divergences.
        The ODE sampler steps uniformly.
    seed : int, optional
        Seeds the prior draw, the path noise and the probes.
    corrector_steps : int
        Metropolis-adjusted Langevin steps on ``exp(-E(y, t_min))`` after the last
        predictor step (:func:`openmm_diffenergy.mcmc.mala`): a predictor-corrector sampler
        whose corrector leaves the model's own ``t_min`` density invariant. The samples
        stay independent (one chain each). The path likelihood no longer applies to them,
        so this needs ``return_nll=False``. ``method["corrector_acceptance"]`` reports the
        acceptance rate.
    corrector_step_size : float, optional
        Langevin step in model units squared; default ``sigma(t_min)^2 / alpha(t_min)^2``.

    Returns
    -------
    SampleResult
        Samples in nm, shape (n, N, 3) or (n, d).
    """
    sde, t_min = _check_common(model, sde, t_min, steps, scheme)
    if method not in ("sde", "ode"):
        raise ValueError(f"method must be 'sde' or 'ode', got {method!r}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    steps = int(steps) if steps is not None else (1000 if method == "sde" else 100)
    if corrector_steps and return_nll:
        raise ValueError("corrector steps move the samples off the path their likelihood "
                         "was integrated along; pass return_nll=False")
    if corrector_steps:
        h = check_settings(sde, t_min, corrector_steps, corrector_step_size,
                           ("corrector_steps", "corrector_step_size"))
    generator = torch.Generator()
    generator.manual_seed(0 if seed is None else int(seed))
    estimator = get_estimator(divergence, n_probes, probe, seed) if return_nll \
        else _ScoreOnly()
    field_ = _Field(model, sde, estimator)
    start = time.perf_counter()
    y = sde.prior_sample(int(n), model.dim, model.n_particles, generator, dtype)
    log_prior = sde.prior_log_prob(y, model.dof, model.n_particles)
    with torch.no_grad():
        if method == "ode":
            y, delta = _rk4(field_, y, sde.T, t_min, steps, progress, "sample ode")
            log_p = log_prior - delta
        else:
            y, log_p = _reverse_sde(field_, sde, y, t_min, steps, scheme, generator,
                                    model.n_particles, return_nll, progress, grid_power)
            log_p = log_prior + log_p if return_nll else None
    if corrector_steps:
        y, acceptance = mala_model_coordinates(model, y, t_min, int(corrector_steps), h,
                                               generator, progress)
    x = y * model.length_scale
    if model.n_particles is not None:
        x = x.reshape(-1, model.n_particles, 3)
    info = {"method": method, "steps": steps, "nfe": field_.nfe, "t_min": t_min, "T": sde.T,
            "dof": model.dof, "length_scale": model.length_scale, "seed": seed,
            "seconds": time.perf_counter() - start}
    if corrector_steps:
        info.update(corrector_steps=int(corrector_steps), corrector_step_size=h,
                    corrector_acceptance=acceptance)
    if log_p is None:
        return SampleResult(x, None, None, info)
    info.update(_describe(estimator))
    if method == "sde":
        info.update(scheme=scheme, grid_power=grid_power)
    nll_model = -log_p
    return SampleResult(x, nll_model + model.dof * math.log(model.length_scale), nll_model, info)


def _reverse_sde(field_, sde, y, t_min, steps, scheme, generator, n_particles, with_nll,
                 progress, power):
    """Euler-Maruyama from T to t_min; returns the samples and sum of log-p increments."""
    times = time_grid(t_min, sde.T, steps, power)[::-1]
    if with_nll:
        p = field_.point(times[0], y)
        total = torch.zeros_like(p["dt_logp"])
    for k in tqdm(range(steps), desc="sample sde", disable=not progress, leave=False):
        t, h = times[k], times[k] - times[k + 1]
        tt = torch.tensor(t, dtype=torch.float64)
        a, g2 = float(sde.drift_coeff(tt)), float(sde.g2(tt))
        if with_nll:
            s = p["s"]
        else:
            field_.nfe += 1
            s = field_.score(y, torch.full((y.shape[0],), t, dtype=y.dtype))
        noise = subspace_noise(y.shape, n_particles, generator=generator, dtype=y.dtype)
        y = y - (a * y - g2 * s) * h + math.sqrt(g2 * h) * noise
        if with_nll:
            q = field_.point(times[k + 1], y)
            total = total + _increment(field_, p, q, scheme, g2)
            p = q
    return y, (total if with_nll else None)
