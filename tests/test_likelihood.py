"""-log p0 along the flow ODE and diffusion paths against exact mixture densities."""
import math

import pytest
import torch

import openmm_diffenergy as de


@pytest.fixture(scope="module")
def gm1():
    return de.mixture_1d()


@pytest.fixture(scope="module")
def x1(gm1):
    return gm1.sample(300, torch.Generator().manual_seed(11))


def test_flow_rk4_matches_exact_1d(gm1, x1):
    res = de.nll(gm1, None, x1, path="flow", steps=100)
    err = (res.nll - (-gm1.log_prob(x1))).abs()
    # measured 2e-6 mean at 100 steps (benchmarks/likelihood_accuracy.py); the contract
    # is 1e-3 mean
    assert err.mean() < 1e-4 and err.max() < 2e-3
    assert res.method["nfe"] == 400 and res.method["solver"] == "rk4"
    assert res.method["dof"] == 1 and res.nll.shape == (300,)


def test_flow_adaptive_matches_exact_2d():
    gm = de.mixture_2d()
    x = gm.sample(200, torch.Generator().manual_seed(4))
    res = de.nll(gm, gm.sde, x, path="flow", solver="dopri5", rtol=1e-7, atol=1e-9)
    assert (res.nll + gm.log_prob(x)).abs().mean() < 1e-4
    assert res.method["nfe"] > 10 and res.method["steps"] is None


@pytest.mark.parametrize("sde", [de.VPSDE(), de.VESDE(0.01, 20.0)], ids=repr)
def test_flow_on_particles_with_length_scale(sde):
    # N = 4 particles, D = 9, length scale 0.2 nm: nll is per nm^D.
    gm = de.particle_mixture(4, 2, seed=2, sde=sde, length_scale=0.2)
    x = gm.sample(64, torch.Generator().manual_seed(0)) + 3.0   # off-centre on purpose
    res = de.nll(gm, sde, x, steps=100, batch_size=32)
    exact = -gm.log_prob(x)
    # the VE prior N(0, 1 + sigma_max^2) mismatches p_T by ~D/(2 sigma_max^2) ~ 1e-2
    tol = 2e-3 if isinstance(sde, de.VPSDE) else 3e-2
    assert (res.nll - exact).abs().mean() < tol
    torch.testing.assert_close(res.nll - res.nll_model,
                               torch.full((64,), 9 * math.log(0.2), dtype=torch.float64))
    assert res.method["chunks"] == 2
    assert res.method["nfe"] == 400 and res.method["nfe_total"] == 800


def test_flow_hutchinson_is_unbiased_and_seeded():
    gm = de.particle_mixture(4, 2, seed=1)
    x = gm.sample(400, torch.Generator().manual_seed(3))
    exact = -gm.log_prob(x)
    a = de.nll(gm, None, x, divergence="hutchinson", seed=5, steps=50)
    b = de.nll(gm, None, x, divergence="hutchinson", seed=5, steps=50)
    torch.testing.assert_close(a.nll, b.nll)
    err = a.nll - exact
    # mean error within 3 standard errors of zero (RK4 error at 50 steps is < 1e-3)
    assert abs(err.mean()) < 3 * err.std() / 20 + 1e-3
    assert err.std() > 1e-3      # it is stochastic
    assert a.method["estimator"] == "hutchinson" and a.method["n_probes"] == 1


@pytest.mark.parametrize("scheme, tol, nfe", [("simpson", 0.002, 1001), ("trapezoid", 0.02, 501),
                                              ("ito", 0.5, 501)])
def test_diffusion_path_matches_exact_1d(gm1, x1, scheme, tol, nfe):
    # mean |error| at 500 steps in benchmarks/likelihood_accuracy.py: ~1e-4 (simpson),
    # ~5e-3 (trapezoid), ~0.2 (ito)
    res = de.nll(gm1, None, x1[:200], path="diffusion", steps=500, seed=1, scheme=scheme)
    assert (res.nll + gm1.log_prob(x1[:200])).abs().mean() < tol
    assert res.method["scheme"] == scheme and res.method["nfe"] == nfe


@pytest.mark.parametrize("scheme, ratio", [("trapezoid", 3), ("simpson", 8)])
def test_diffusion_path_converges_with_steps(gm1, x1, scheme, ratio):
    # 8x the steps: first order (trapezoid) gains ~8x, Simpson far more
    exact = -gm1.log_prob(x1[:100])
    errs = [(de.nll(gm1, None, x1[:100], path="diffusion", steps=s, seed=2, scheme=scheme)
             .nll - exact).abs().mean().item() for s in (50, 400)]
    assert errs[1] < errs[0] / ratio


def test_user_path_deterministic_interpolation():
    # A smooth path y_t = alpha(t) y0 + sigma(t) z from y0 to a fixed prior-like point.
    # sigma(t) ~ sqrt(t) near 0, so the grid is quadratic in time (t = u^2), which makes
    # the path smooth in u; the trapezoidal rule is then second order and 400 steps
    # give < 1e-3 error.
    gm = de.mixture_2d()
    sde = gm.sde
    x0 = gm.sample(50, torch.Generator().manual_seed(8))
    z = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    times = torch.linspace(0.0, 1.0, 401, dtype=torch.float64) ** 2
    path = sde.alpha(times)[:, None, None] * x0[None] + sde.sigma(times)[:, None, None] * z
    res = de.path_nll(gm, sde, times, path)
    assert (res.nll + gm.log_prob(x0)).abs().max() < 1e-3
    # the same path walked from T down to 0 gives the same answer
    rev = de.path_nll(gm, sde, times.flip(0), path.flip(0))
    torch.testing.assert_close(rev.nll, res.nll)
    trap = de.path_nll(gm, sde, times, path, scheme="trapezoid")
    assert (trap.nll + gm.log_prob(x0)).abs().max() < 1e-2
    # Ito with g_path = 0 on a smooth path is first order but consistent
    ito = de.path_nll(gm, sde, times, path, scheme="ito")
    assert (ito.nll + gm.log_prob(x0)).abs().mean() < 0.05


def test_sde_sampler_likelihood_along_its_own_path(gm1):
    res = de.sample(gm1, None, 300, steps=500, seed=3)
    err = res.nll + gm1.log_prob(res.x)
    assert err.abs().mean() < 2e-3
    assert res.x.shape == (300, 1)


def test_ode_sampler_draws_the_mixture(gm1):
    # Kolmogorov-Smirnov against the exact CDF; 2000 samples, critical value at
    # alpha = 0.001 is 1.95 / sqrt(n) = 0.044.
    res = de.sample(gm1, None, 2000, method="ode", steps=60, seed=4)
    xs = res.x[:, 0].sort().values
    grid = torch.linspace(-5, 5, 20001, dtype=torch.float64)
    pdf = (-gm1.energy(grid[:, None], 0.0)).exp()
    cdf = torch.cumulative_trapezoid(pdf, grid)
    cdf = torch.cat([cdf.new_zeros(1), cdf])
    emp = torch.arange(1, 2001, dtype=torch.float64) / 2000
    model_cdf = torch.from_numpy(__import__("numpy").interp(xs.numpy(), grid.numpy(),
                                                            cdf.numpy()))
    assert (emp - model_cdf).abs().max() < 0.044
    assert (res.nll + gm1.log_prob(res.x)).abs().mean() < 1e-3


def test_sampler_without_likelihood(gm1):
    res = de.sample(gm1, None, 10, steps=50, return_nll=False, seed=0)
    assert res.nll is None and res.method["nfe"] == 50


@pytest.mark.parametrize("kwargs, match", [
    ({"path": "bridge"}, "path must be"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"solver": "euler"}, "unknown solver"),
    ({"t_min": 1.0}, "t_min"),
    ({"scheme": "midpoint", "path": "diffusion"}, "scheme"),
    ({"grid_power": 0.5, "path": "diffusion"}, "grid power"),
    ({"divergence": "laplace"}, "unknown divergence"),
    ({"divergence": "fast"}, "forward-Laplacian rule"),   # a mixture has no fast rule
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_nll_arguments(gm1, kwargs, match):
    x = torch.zeros(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        de.nll(gm1, None, x, **kwargs)


def test_bad_nll_positions(gm1):
    with pytest.raises(ValueError, match="NaN"):
        de.nll(gm1, None, torch.tensor([[float("nan")]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected \(B, 1\)"):
        de.nll(gm1, None, torch.zeros(3, dtype=torch.float64))


def test_bad_paths(gm1):
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    path = torch.zeros(5, 2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="reach T"):
        de.path_nll(gm1, None, times * 0.5, path)
    with pytest.raises(ValueError, match="monotone|increasing"):
        de.path_nll(gm1, None, torch.tensor([0.0, 0.5, 0.4, 0.8, 1.0]), path)
    with pytest.raises(ValueError, match="frames"):
        de.path_nll(gm1, None, times, path[:4])
