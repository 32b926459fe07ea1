"""Metropolis-adjusted Langevin moves against exact Gaussian-mixture densities."""
import numpy as np
import pytest
import torch

import openmm_diffenergy as de


def ks_statistic(model, xs, t):
    """Kolmogorov-Smirnov distance of 1D samples from the exact density ``exp(-E(x, t))``."""
    xs = torch.as_tensor(xs).reshape(-1).sort().values
    grid = torch.linspace(-6, 6, 24001, dtype=torch.float64)
    pdf = (-model.energy(grid[:, None], t)).exp()
    cdf = torch.cat([pdf.new_zeros(1), torch.cumulative_trapezoid(pdf, grid)])
    emp = torch.arange(1, len(xs) + 1, dtype=torch.float64) / len(xs)
    return float((emp - torch.from_numpy(np.interp(xs.numpy(), grid.numpy(), cdf.numpy())))
                 .abs().max())


def exact_diffused(model, n, t, seed):
    g = torch.Generator().manual_seed(seed)
    tt = torch.tensor(t, dtype=torch.float64)
    x0 = model.sample(n, g)
    return model.sde.alpha(tt) * x0 + model.sde.sigma(tt) * torch.randn(x0.shape, generator=g,
                                                                         dtype=x0.dtype)


def test_mala_keeps_the_exact_density_where_unadjusted_langevin_would_not():
    # steps of h = 0.02 against modes of variance 0.02-0.09: unadjusted Langevin would
    # inflate the narrowest mode's variance about 1.8-fold; the Metropolis test keeps it.
    gm = de.mixture_1d()
    t, n = 0.01, 3000
    x = exact_diffused(gm, n, t, seed=1)
    assert ks_statistic(gm, x, t) < 1.95 / n ** 0.5
    moved, info = de.mala(gm, x, steps=100, step_size=0.02, t=t, seed=2)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    assert 0.3 < info["acceptance"] < 0.95           # rejections are doing work
    assert ks_statistic(gm, moved, t) < 1.95 / n ** 0.5     # KS, alpha = 0.001


def test_mala_relaxes_a_bad_start_to_the_exact_density():
    gauss = de.GaussianMixtureEnergy(np.zeros((1, 1)), [0.09])
    t, n = 0.1, 2000
    start = torch.full((n, 1), 2.0, dtype=torch.float64)     # 6 standard deviations out
    assert ks_statistic(gauss, start, t) > 0.99
    moved, info = de.mala(gauss, start, steps=300, step_size=0.05, t=t, seed=0)
    assert ks_statistic(gauss, moved, t) < 1.95 / n ** 0.5
    assert info["steps"] == 300 and info["t"] == t


def test_mala_on_particles_stays_centred_and_keeps_bond_statistics():
    # two particles, isotropic covariance c per coordinate: the bond vector is N(0, 2c I)
    c = 0.0007
    pair = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [c], length_scale=0.05)
    x = pair.sample(4000, torch.Generator().manual_seed(5))
    moved, info = de.mala(pair, x.numpy(), steps=50, step_size=0.1, t=0.0, seed=1)
    assert moved.shape == (4000, 2, 3) and info["acceptance"] > 0.2
    assert moved.sum(1).abs().max() < 1e-12
    r2 = ((moved[:, 1] - moved[:, 0]) ** 2).sum(-1).mean()
    assert abs(float(r2) / (6 * c) - 1) < 0.06
    with pytest.raises(ValueError, match="sigma"):     # no default step at t = 0
        de.mala(pair, x, steps=1, t=0.0)
    with pytest.raises(ValueError, match="steps"):
        de.mala(pair, x, steps=-1, step_size=0.1)
    with pytest.raises(ValueError, match="the model is for 2"):
        de.mala(pair, x[:, :1], steps=1, step_size=0.1)


def test_sampler_with_corrector_steps():
    gm = de.mixture_1d()
    n = 2000
    plain = de.sample(gm, None, n, steps=200, return_nll=False, seed=4, t_min=0.01)
    pc = de.sample(gm, None, n, steps=200, return_nll=False, seed=4, t_min=0.01,
                   corrector_steps=20)
    assert not torch.equal(plain.x, pc.x)
    assert pc.method["corrector_steps"] == 20
    assert 0 < pc.method["corrector_acceptance"] <= 1
    tt = torch.tensor(pc.method["t_min"], dtype=torch.float64)
    assert pc.method["corrector_step_size"] == pytest.approx(
        float(gm.sde.sigma2(tt) / gm.sde.alpha(tt) ** 2))
    assert ks_statistic(gm, pc.x, pc.method["t_min"]) < 1.95 / n ** 0.5
    with pytest.raises(ValueError, match="return_nll=False"):
        de.sample(gm, None, 10, steps=20, corrector_steps=5)
    with pytest.raises(ValueError, match="corrector_steps"):
        de.sample(gm, None, 10, steps=20, return_nll=False, t_min=0.01, corrector_steps=1.5)
