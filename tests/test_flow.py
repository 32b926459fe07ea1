"""Flow-ODE densities of given structures and mirror folding, against exact mixtures.

Gaussian mixtures have exact diffused densities, so ``-log q`` of the flow sampler, of
given structures and of the mirror-folded sampler ``q(x) + q(Rx)`` are all known.
"""
import math

import numpy as np
import openmm
import pytest
import torch

import openmm_diffenergy as de
from openmm_diffenergy.flow import MIRROR

KT = de.kt_kj_per_mol(300.0)


def mixture():
    gm = de.particle_mixture(3, 2, seed=1, length_scale=0.3)
    gm.t_min = 1e-3
    return gm


def above(x):
    """The fold condition: particle 0 above the xy-plane (the reflection flips it)."""
    return np.asarray(x)[:, 0, 2] > 0


def test_flow_log_density_matches_the_sampler_and_the_exact_density():
    gm = mixture()
    kw = dict(batch_size=6, seed=3, rtol=1e-6, atol=1e-6, dtype=torch.float64)
    drawn = de.sample_with_likelihood(gm, 12, **kw)
    again = de.flow_log_density(gm, drawn.x, **kw)
    exact = -gm.log_prob(drawn.x, gm.t_min).numpy()
    assert again.nll.numpy() == pytest.approx(exact, abs=2e-3)
    assert again.nll.numpy() == pytest.approx(drawn.nll.numpy(), abs=2e-3)
    # fixed RK4 on the sampler's cubic grid, run backwards
    rk4 = de.flow_log_density(gm, drawn.x, solver="rk4", steps=80, dtype=torch.float64)
    assert rk4.nll.numpy() == pytest.approx(exact, abs=5e-3)
    assert rk4.method["grid"] == "cubic" and rk4.method["failed"] == 0


def test_flow_log_density_rejects_bad_positions():
    gm = mixture()
    x = torch.zeros(2, 3, 3, dtype=torch.float64)
    x[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        de.flow_log_density(gm, x)
    with pytest.raises(ValueError, match="no structures"):
        de.flow_log_density(gm, torch.zeros(0, 3, 3))
    with pytest.raises(ValueError, match="batch_size"):
        de.flow_log_density(gm, torch.zeros(2, 3, 3), batch_size=0)


def test_mirror_fold_reflects_the_outside_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 3))
    folded, mirrored = de.mirror_fold(x, above)
    assert np.array_equal(mirrored, ~above(x))
    assert above(folded).all()
    assert np.array_equal(folded[~mirrored], x[~mirrored])
    assert np.allclose(folded[mirrored], x[mirrored] * np.array(MIRROR))
    # a condition the reflection does not map onto its complement cannot be folded into
    with pytest.raises(ValueError, match="still outside"):
        de.mirror_fold(x, lambda z: np.asarray(z)[:, 0, 0] > 0)
    with pytest.raises(ValueError, match="values for"):
        de.mirror_fold(x, lambda z: np.ones(3, dtype=bool))


def test_folded_log_density_is_the_exact_sum_of_both_images():
    gm = mixture()
    kw = dict(batch_size=8, seed=5, rtol=1e-6, atol=1e-6, dtype=torch.float64)
    drawn = de.sample_with_likelihood(gm, 16, **kw)
    x = drawn.x.numpy()
    nll_fold, info = de.folded_log_density(gm, x, drawn.nll.numpy(), **kw)
    folded, _ = de.mirror_fold(x, above)
    log_p = gm.log_prob(torch.as_tensor(folded), gm.t_min).numpy()
    log_p_mirror = gm.log_prob(torch.as_tensor(folded * np.array(MIRROR)), gm.t_min).numpy()
    exact = -np.logaddexp(log_p, log_p_mirror)
    assert nll_fold == pytest.approx(exact, abs=3e-3)
    assert info["failed"] == 0
    # the mixture is not mirror symmetric, so folding really changes the density
    assert np.abs(log_p - log_p_mirror).max() > 1.0


def test_reweight_iid_fold_doubles_a_mirror_symmetric_density():
    """An isotropic pair is its own mirror image: q_fold = 2 q, and the fold keeps every
    sample (weights and profile as without a condition)."""
    gm = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [0.0007], length_scale=0.05)
    gm.t_min = 0.0
    system = openmm.System()
    for _ in range(2):
        system.addParticle(12.0)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.0, 3.0e4)
    system.addForce(bond)

    def z_up(x):
        x = np.asarray(x)
        return x[:, 1, 2] > x[:, 0, 2]

    res = de.reweight_iid(gm, system, n=40, temperature=300.0, cvs={}, batch_size=40,
                          rtol=1e-6, atol=1e-6, condition=z_up, fold=True,
                          dtype=torch.float64, progress=False)
    assert res.info["n_dropped"] == 0 and z_up(res.x).all()
    assert 5 < res.info["mirrored"] < 35
    assert res.info["condition_fraction"] == pytest.approx(1 - res.info["mirrored"] / 40)
    exact = gm.log_prob(torch.as_tensor(res.x)).numpy() + math.log(2.0)
    assert -res.proposal == pytest.approx(exact, abs=1e-3)
    with pytest.raises(ValueError, match="needs a condition"):
        de.reweight_iid(gm, system, n=4, fold=True, progress=False)


def _diffused(gm, n, t, seed):
    """``n`` exact draws of ``p_t`` (nm): ``alpha x0 + sigma s eps`` on the subspace."""
    from openmm_diffenergy.coordinates import subspace_noise

    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, g).reshape(n, -1)
    tt = torch.tensor(t, dtype=torch.float64)
    eps = subspace_noise(x0.shape, gm.n_particles, generator=g, dtype=torch.float64)
    return (gm.sde.alpha(tt) * x0 + gm.sde.sigma(tt) * gm.length_scale * eps).reshape(n, -1, 3)


def test_denoise_log_jacobian_is_exact_for_a_gaussian():
    # one Gaussian: Hess E = (alpha^2 C + sigma^2)^-1 on the subspace (model units), so
    # J = I / alpha - c Hess, c = (1 - alpha) / alpha for the VP SDE, and the step are
    # known in closed form
    from openmm_diffenergy.coordinates import subspace_basis

    s, t = 0.3, 0.02
    gm = de.particle_mixture(4, 1, seed=2, length_scale=s)
    x = _diffused(gm, 5, t, seed=0)
    x0, logdet = de.denoise(gm, x, t=t)
    basis = torch.kron(subspace_basis(4), torch.eye(3, dtype=torch.float64))
    cov = torch.tensor(gm.config()["covariances"][0], dtype=torch.float64)
    cov = basis.T @ cov @ basis / s ** 2
    tt = torch.tensor(t, dtype=torch.float64)
    a, sig2 = gm.sde.alpha(tt), gm.sde.sigma2(tt)
    shrink, half = 1 / a, (1 - a) / a
    hess = torch.linalg.inv(a ** 2 * cov + sig2 * torch.eye(9, dtype=torch.float64))
    jac = shrink * torch.eye(9, dtype=torch.float64) - half * hess
    assert logdet == pytest.approx(np.full(5, float(torch.logdet(jac))), abs=1e-9)
    mean = a * torch.tensor(gm.config()["means"][0], dtype=torch.float64).reshape(1, -1) / s
    y = (x.reshape(5, -1) - x.reshape(5, -1, 3).mean(1, keepdim=True).repeat(1, 4, 1)
         .reshape(5, -1)) / s
    y0 = shrink * y - half * ((y - mean) @ basis @ hess @ basis.T)
    centroid = x.mean(1, keepdim=True)
    expected = (y0 * s).reshape(5, 4, 3) + centroid
    assert x0 == pytest.approx(expected.numpy(), abs=1e-10)
    assert de.denoise(gm, x, t=1e-4)[1] == pytest.approx(np.zeros(5), abs=0.05)  # ~identity


def test_denoise_raises_the_ess_against_p0_and_keeps_weights_exact():
    # samples of p_t reweighted to p_0: the step takes most of the sigma(t) noise off the
    # narrowest modes; with the exact log det the weighted mean of |x|^2 stays unbiased
    gm = de.particle_mixture(4, 1, seed=2, length_scale=0.3)
    t, n = 0.05, 4000
    x = _diffused(gm, n, t, seed=1)
    log_q = gm.log_prob(x, t).numpy()
    plain = gm.log_prob(x, 0.0).numpy() - log_q
    x0, logdet = de.denoise(gm, x, t=t, batch_size=1000)
    stepped = gm.log_prob(torch.as_tensor(x0), 0.0).numpy() - (log_q - logdet)
    ess_plain, ess_step = de.ess(plain), de.ess(stepped)
    assert ess_plain < 0.3 and ess_step > 0.7   # measured 0.20 and 0.81
    centred = x0 - x0.mean(1, keepdims=True)
    r2 = (centred ** 2).sum((1, 2))
    w = np.exp(stepped - stepped.max())
    truth = (gm.sample(200000, torch.Generator().manual_seed(9)) ** 2).sum((1, 2)).mean()
    assert (w * r2).sum() / w.sum() == pytest.approx(float(truth), rel=0.02)


def test_denoise_rejects_bad_input():
    gm = mixture()
    with pytest.raises(ValueError, match="NaN"):
        de.denoise(gm, torch.full((2, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="positive"):
        de.denoise(gm, torch.zeros(2, 3, 3), t=0.0)
    # a step far longer than the energy's curvature allows (a schedule 100x faster than
    # the one the energy diffused under) makes J indefinite: flagged, not returned
    fast = de.VPSDE(beta_min=50.0, beta_max=100.0)
    x = _diffused(gm, 2, 0.01, seed=0)
    assert np.isnan(de.denoise(gm, x, t=0.01, sde=fast)[1]).all()
