"""Noise schedules: marginals against simulation, coefficients against finite differences."""
import math

import pytest
import torch

import openmm_diffenergy as de

SDES = [de.VPSDE(), de.VPSDE(beta_min=0.5, beta_max=5.0), de.VESDE(0.01, 5.0)]


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_coefficients_match_finite_differences(sde):
    # a = d log alpha / dt and g^2 = d sigma^2/dt - 2 a sigma^2; central differences in
    # float64 with h = 1e-5 are accurate to ~1e-8 relative.
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    dlog_alpha = (sde.alpha(t + h).log() - sde.alpha(t - h).log()) / (2 * h)
    dsigma2 = (sde.sigma2(t + h) - sde.sigma2(t - h)) / (2 * h)
    torch.testing.assert_close(sde.drift_coeff(t), dlog_alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sde.g2(t), dsigma2 - 2 * sde.drift_coeff(t) * sde.sigma2(t),
                               rtol=1e-6, atol=1e-8)
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(sde.sigma2(zero)) == 0.0 and float(sde.alpha(zero)) == 1.0


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_marginal_matches_euler_maruyama(sde, gen):
    # Simulate dx = a x dt + g dW from x0 with 2000 small steps and compare the sample
    # mean and variance at t = 0.6 with alpha x0 and sigma^2. With 20000 paths the
    # standard error of the variance is sigma^2 * sqrt(2/n) = 1%; the Euler bias is
    # O(1/steps). Tolerance 4% of sigma^2 (about 4 standard errors).
    n, steps, t_end = 20000, 2000, 0.6
    x0 = 0.8
    x = torch.full((n, 1), x0, dtype=torch.float64)
    h = t_end / steps
    for k in range(steps):
        t = torch.tensor([k * h], dtype=torch.float64)
        x = x + sde.drift_coeff(t) * x * h + sde.g2(t).sqrt() * math.sqrt(h) * torch.randn(
            x.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([t_end], dtype=torch.float64)
    mean, var = float(sde.alpha(t)) * x0, float(sde.sigma2(t))
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / n) + 2e-3 * abs(mean)
    assert abs(x.var().item() - var) < 0.04 * var
    # marginal_sample draws the same law directly
    y = sde.marginal_sample(torch.full((n, 1), x0, dtype=torch.float64), t.expand(n),
                            generator=gen)
    assert abs(y.mean().item() - mean) < 4 * math.sqrt(var / n)
    assert abs(y.var().item() - var) < 0.04 * var


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_transitions_compose_to_marginal(sde, gen):
    # y_0.3 | y_0 then y_0.7 | y_0.3 must be distributed as y_0.7 | y_0.
    n = 40000
    y0 = torch.full((n, 2), -0.5, dtype=torch.float64)
    y = sde.transition_sample(y0, 0.0, 0.3, generator=gen)
    y = sde.transition_sample(y, 0.3, 0.7, generator=gen)
    t = torch.tensor([0.7], dtype=torch.float64)
    var = float(sde.sigma2(t))
    torch.testing.assert_close(y.mean(0), torch.full((2,), -0.5 * float(sde.alpha(t)),
                                                     dtype=torch.float64),
                               atol=4 * math.sqrt(var / n), rtol=0)
    assert abs(y.var(0).mean().item() - var) < 0.03 * var


def test_prior_is_normalized_density_on_subspace(gen):
    sde = de.VESDE(0.01, 2.0)
    # 1D: integrate exp(log p_T) on a grid
    v = sde.prior_variance
    grid = torch.linspace(-12 * math.sqrt(v), 12 * math.sqrt(v), 20001, dtype=torch.float64)
    p = sde.prior_log_prob(grid[:, None], dof=1).exp()
    assert abs(torch.trapezoid(p, grid).item() - 1.0) < 1e-8
    # particles: samples are centred and |y|^2 / v has D = 3(N - 1) degrees of freedom
    n_particles = 5
    y = sde.prior_sample(20000, 3 * n_particles, n_particles, generator=gen)
    assert y.reshape(-1, n_particles, 3).mean(1).abs().max() < 1e-12
    chi2 = (y * y).sum(-1) / v
    assert abs(chi2.mean().item() - 12) < 0.1


def test_bad_schedules():
    with pytest.raises(ValueError):
        de.VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError):
        de.VESDE(sigma_min=2.0, sigma_max=1.0)
    assert isinstance(de.sde_from_config(de.VPSDE().config()), de.VPSDE)
    with pytest.raises(ValueError, match="unknown SDE"):
        de.sde_from_config({"type": "OU"})
