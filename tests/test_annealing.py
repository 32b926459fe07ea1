"""Annealed importance sampling from a learned energy to a classical System.

Oracle: a Gaussian pair model against a stiffer harmonic bond (OpenMM). The annealed,
weighted samples must follow the bond's exact chi distribution, the weights must estimate
the same partition-function ratio as direct importance sampling, and the ESS must beat
the direct one, which is known in closed form.
"""
import math

import numpy as np
import openmm
import pytest
import torch
from scipy import stats

import openmm_diffenergy as de
from _helpers import bonded_pair
from openmm_diffenergy.annealing import ClassicalEnergy, anneal, beta_schedule

KT = de.kt_kj_per_mol(300.0)
V_MODEL = 0.0007        # model variance per subspace dimension, nm^2: Var(x1 - x0) = 1.4e-3
V_TARGET = 0.0004       # target Var(x1 - x0) per axis, nm^2 (3.5 times narrower)
STEP = 0.04             # MALA step, model units^2 (length scale 0.05 nm)


def pair_model():
    gm = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [V_MODEL], length_scale=0.05)
    gm.t_min = 0.0
    return gm


def pair_system(v=V_TARGET):
    return bonded_pair(KT / v)          # Var(x1 - x0) = v per axis


def exact_ess(s_q, s_p, d):
    return (s_p * math.sqrt(2 * s_q ** 2 - s_p ** 2) / s_q ** 2) ** d


def log_mean_exp(a):
    m = a.max()
    return float(m + np.log(np.mean(np.exp(a - m))))


def test_classical_energy_matches_openmm_and_handles_bad_positions():
    target = ClassicalEnergy(pair_system(), 300.0)
    x = np.random.default_rng(0).normal(0, 0.05, (4, 2, 3))
    u, g = target(x)
    r = x[:, 1] - x[:, 0]
    assert u == pytest.approx(0.5 * (r ** 2).sum(1) / V_TARGET, rel=1e-6)
    np.testing.assert_allclose(g[:, 1], r / V_TARGET, rtol=1e-6)
    x[2, 0, 0] = np.nan
    u, g = target(x)
    assert u[2] == np.inf and (g[2] == 0).all() and np.isfinite(u[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="shape"):
        target(np.zeros((2, 3, 3)))


def test_anneal_reaches_the_exact_target_and_beats_direct_weights():
    gm, system = pair_model(), pair_system()
    frames = gm.sample(1500, torch.Generator().manual_seed(1)).numpy()
    target = ClassicalEnergy(system, 300.0)
    res = anneal(gm, target, frames, betas=beta_schedule(20), steps_per_stage=5,
                 step_size=STEP, seed=2, progress=False)
    assert res.x.shape == frames.shape and np.isfinite(res.log_w).all()
    assert 0.3 < res.info["mean_acceptance"] < 1.0
    # the returned energies are those of the returned positions
    assert res.reduced_energy == pytest.approx(target(res.x)[0], rel=1e-9)
    w = np.exp(res.log_w - res.log_w.max())
    w /= w.sum()
    d = np.linalg.norm(res.x[:, 1] - res.x[:, 0], axis=-1)
    # weighted <d^2> is the target's 3 V_TARGET (unweighted it is between model and target)
    assert np.sum(w * d ** 2) == pytest.approx(3 * V_TARGET, rel=0.08)
    # weighted d follows the exact chi(3) distribution of the target (KS distance)
    order = np.argsort(d)
    ks = np.abs(np.cumsum(w[order]) - stats.chi(3, scale=math.sqrt(V_TARGET)).cdf(d[order]))
    assert ks.max() < 0.06          # 0.014-0.039 over four seeds; unweighted about 0.4
    # the AIS weights estimate Z_target / Z_model like direct importance sampling does
    big = gm.sample(40000, torch.Generator().manual_seed(3)).numpy()
    direct = -target(big)[0] + de.model_energies(gm, big)
    assert log_mean_exp(res.log_w) == pytest.approx(log_mean_exp(direct), abs=0.08)
    # and far fewer of them are wasted: direct ESS is 0.34 in closed form
    s_q, s_p = math.sqrt(2 * V_MODEL), math.sqrt(V_TARGET)
    assert de.ess(direct) == pytest.approx(exact_ess(s_q, s_p, 3), abs=0.03)
    assert de.ess(res.log_w) > 0.8 > exact_ess(s_q, s_p, 3) + 0.4   # 0.86-0.87


def test_reweighting_drivers_anneal_iid_and_md_samples():
    gm, system = pair_model(), pair_system()
    d = {"d": lambda x: np.linalg.norm(x[:, 1] - x[:, 0], axis=-1)}
    kw = dict(temperature=300.0, cvs=d, ranges={"d": (0.0, 0.08)}, bins=8, n_bootstrap=0,
              anneal_stages=20, anneal_steps=5, anneal_step_size=STEP, progress=False)
    frames = gm.sample(800, torch.Generator().manual_seed(4))
    md = de.reweight_md(gm, system, frames=frames, block_size=1, **kw)
    iid = de.reweight_iid(gm, system, n=400, batch_size=200, rtol=1e-6, atol=1e-6, **kw)
    for res in (md, iid):
        assert res.ess > 0.8 and res.info["annealing"]["stages"] == 20
        assert np.sum(res.weights * res.cvs["d"] ** 2) == pytest.approx(3 * V_TARGET,
                                                                       rel=0.1)
        # log w = -u/kT + proposal, and u belongs to the annealed positions
        assert res.reduced_energy == pytest.approx(
            de.reduced_energies(system, res.x, 300.0), rel=1e-9)
    # given samples skip the sampler and reproduce a run that drew them
    draws = de.sample_with_likelihood(gm, 50, seed=5, rtol=1e-6, atol=1e-6)
    again = de.reweight_iid(gm, system, samples=(draws.x, draws.nll), **kw)
    assert again.info["sampler"] == "given" and len(again.x) == 50
    with pytest.raises(ValueError, match="alternatives"):
        de.reweight_md(gm, system, frames=frames, denoise=True, anneal_stages=3,
                       progress=False)
    with pytest.raises(ValueError, match="anneal_stages"):
        de.reweight_md(gm, system, frames=frames, anneal_stages=-1, progress=False)
    with pytest.raises(ValueError, match="samples"):
        de.reweight_iid(gm, system, samples=(draws.x, draws.nll[:3]), progress=False)


def test_anneal_input_errors():
    gm, target = pair_model(), ClassicalEnergy(pair_system(), 300.0)
    x = np.zeros((3, 2, 3))
    with pytest.raises(ValueError, match="betas"):
        anneal(gm, target, x, betas=[0.0, 0.5], step_size=STEP, progress=False)
    with pytest.raises(ValueError, match="betas"):
        anneal(gm, target, x, betas=[0.0, 0.6, 0.4, 1.0], step_size=STEP, progress=False)
    with pytest.raises(ValueError, match="step"):
        anneal(gm, target, x, step_size=None, progress=False)      # sigma(0) = 0
    with pytest.raises(ValueError, match="shape"):
        anneal(gm, target, np.zeros((3, 3, 3)), step_size=STEP, progress=False)
    with pytest.raises(ValueError, match="stages"):
        beta_schedule(0)
    three = openmm.System()
    for _ in range(3):
        three.addParticle(1.0)
    with pytest.raises(ValueError, match="particles"):
        anneal(gm, ClassicalEnergy(three, 300.0), x, step_size=STEP, progress=False)
