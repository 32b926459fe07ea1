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
