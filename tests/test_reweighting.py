"""Importance weights, ESS, free-energy profiles, i.i.d./MD reweighting and BAR/MBAR.

Analytic oracles: Gaussian proposals and targets (ESS in closed form), chi-distributed
distances of a harmonic pair, and harmonic oscillators with ``Delta F = (d/2) ln(k_b/k_a)``.
"""
import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from scipy import stats

import openmm_diffenergy as de
from _helpers import bonded_pair

KT = de.kt_kj_per_mol(300.0)


# --------------------------------------------------------------------------- ESS oracle

def gaussian_weight_moment(k, s_q, s_p, d):
    """``E_q[w^k]`` for ``w = p/q``, ``q = N(0, s_q^2 I_d)``, ``p = N(0, s_p^2 I_d)``.

    Per dimension ``int p^k q^(1-k) dx = s_q^(k-1) s_p^(-k) / sqrt(k/s_p^2 - (k-1)/s_q^2)``
    (a Gaussian integral; finite when ``k s_q^2 > (k-1) s_p^2``), and dimensions factor.
    """
    per_dim = s_q ** (k - 1) / s_p ** k / math.sqrt(k / s_p ** 2 - (k - 1) / s_q ** 2)
    return per_dim ** d


def exact_ess(s_q, s_p, d):
    """Population Kish ESS fraction ``E_q[w]^2 / E_q[w^2] = [s_p sqrt(2 s_q^2 - s_p^2) / s_q^2]^d``."""
    return (s_p * math.sqrt(2 * s_q ** 2 - s_p ** 2) / s_q ** 2) ** d


def test_exact_ess_formula_matches_moments():
    for s_q, s_p, d in [(1.2, 1.0, 3), (0.9, 1.0, 2), (2.0, 1.5, 5)]:
        m1 = gaussian_weight_moment(1, s_q, s_p, d)
        m2 = gaussian_weight_moment(2, s_q, s_p, d)
        assert m1 == pytest.approx(1.0, rel=1e-12)          # E_q[p/q] = 1
        assert m1 ** 2 / m2 == pytest.approx(exact_ess(s_q, s_p, d), rel=1e-12)
    assert exact_ess(1.0, 1.0, 7) == 1.0


@pytest.mark.parametrize("s_q,s_p,d", [(1.2, 1.0, 3), (1.0, 0.8, 2)])
def test_weights_and_ess_gaussian(s_q, s_p, d):
    rng = np.random.default_rng(0)
    n = 200_000
    x = rng.normal(0.0, s_q, size=(n, d))
    log_q = stats.norm.logpdf(x, scale=s_q).sum(1)
    u = 0.5 * (x ** 2).sum(1) / s_p ** 2          # reduced energy of N(0, s_p^2), any offset
    w = de.importance_weights(log_q=log_q, reduced_target_energy=u + 123.0)
    assert w.shape == (n,) and w.sum() == pytest.approx(1.0, abs=1e-12) and (w >= 0).all()
    # weighted moments reproduce the target: E_p[x^2] = s_p^2 per dimension
    assert (w[:, None] * x ** 2).sum(0) == pytest.approx(np.full(d, s_p ** 2), rel=0.02)
    log_w = np.log(w)
    est = de.ess(log_w)
    # tolerance: 5 standard errors of the ratio estimator m1^2/m2 (delta method), with
    # the population moments E_q[w^k], k <= 4, in closed form
    m = {k: gaussian_weight_moment(k, s_q, s_p, d) for k in (1, 2, 3, 4)}
    grad = np.array([2 * m[1] / m[2], -m[1] ** 2 / m[2] ** 2])
    cov = np.array([[m[2] - m[1] ** 2, m[3] - m[1] * m[2]],
                    [m[3] - m[1] * m[2], m[4] - m[2] ** 2]])
    se = math.sqrt(grad @ cov @ grad / n)
    assert abs(est - exact_ess(s_q, s_p, d)) < 5 * se
    assert se < 0.01          # the check is sharp
    # the unnormalized log weights give the same ESS; equal weights give 1
    assert de.ess(log_w + 50.0) == pytest.approx(est, rel=1e-12)
    assert de.ess(np.zeros(10)) == pytest.approx(1.0)
    assert de.ess(np.array([0.0, -np.inf, -np.inf, -np.inf])) == pytest.approx(0.25)


def test_md_weights_and_units():
    e = np.array([1.0, 2.0, 3.0])
    u = np.array([1.5, 2.5, 3.0])
    w = de.importance_weights(learned_energy=e, reduced_target_energy=u)
    expect = np.exp(e - u) / np.exp(e - u).sum()
    assert w == pytest.approx(expect)
    # target energies in kJ/mol with a temperature, plain or as Quantities
    w2 = de.importance_weights(learned_energy=e, target_energy=u * KT, temperature=300.0)
    w3 = de.importance_weights(learned_energy=e,
                               target_energy=(u * KT / 4.184) * unit.kilocalorie_per_mole,
                               temperature=300.0 * unit.kelvin)
    assert w2 == pytest.approx(expect) and w3 == pytest.approx(expect)
    # +inf target energy: weight zero
    w4 = de.importance_weights(log_q=np.zeros(3), reduced_target_energy=[0.0, np.inf, 0.0])
    assert w4 == pytest.approx([0.5, 0.0, 0.5])


@pytest.mark.parametrize("kwargs,match", [
    ({"log_q": [0.0, np.nan], "reduced_target_energy": [0.0, 0.0]}, "NaN"),
    ({"log_q": [0.0, 0.0, 0.0], "reduced_target_energy": [0.0, 0.0]}, "differ"),
    ({"log_q": [0.0], "learned_energy": [0.0], "reduced_target_energy": [0.0]}, "exactly one"),
    ({"reduced_target_energy": [0.0]}, "exactly one"),
    ({"log_q": [0.0]}, "exactly one"),
    ({"log_q": [[0.0]], "reduced_target_energy": [[0.0]]}, "one-dimensional"),
    ({"log_q": [0.0], "target_energy": [1.0]}, "temperature"),
    ({"log_q": [0.0], "target_energy": [1.0], "temperature": -5.0}, "positive"),
    ({"log_q": [-np.inf, 0.0], "reduced_target_energy": [0.0, 0.0]}, "zero proposal"),
    ({"log_q": [0.0, 0.0], "reduced_target_energy": [np.inf, np.inf]}, "every"),
    ({"log_q": [0.0], "target_energy": 1.0 * unit.nanometer, "temperature": 300}, "units"),
])
def test_weight_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        de.importance_weights(**kwargs)


def test_ess_errors():
    with pytest.raises(ValueError, match="NaN"):
        de.ess([0.0, np.nan])
    with pytest.raises(ValueError, match="zero"):
        de.ess([-np.inf, -np.inf])


# --------------------------------------------------------------------------- profiles

def test_free_energy_profile_of_known_distribution():
    """Reweighted N(0, 1.5^2) samples give the exact -ln P_b of N(0, 1) per bin."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.5, 100_000)
    w = de.importance_weights(log_q=stats.norm.logpdf(x, scale=1.5),
                              reduced_target_energy=0.5 * x ** 2)
    prof = de.free_energy_profile(x, w, bins=12, range=(-3, 3), temperature=300.0,
                                  n_bootstrap=50, align="min")
    edges = np.linspace(-3, 3, 13)
    p_exact = np.diff(stats.norm.cdf(edges))
    f_exact = -np.log(p_exact / p_exact.sum())
    f_exact -= f_exact.min()
    assert np.all(np.isfinite(prof.error_kt)) and np.all(prof.error_kt > 0)
    assert np.abs(prof.f_kt - f_exact).max() < 5 * prof.error_kt.max() + 0.02
    assert prof.f_kj_per_mol == pytest.approx(prof.f_kt * KT)
    assert prof.population.sum() == pytest.approx(1.0)
    # the RMSE against an exact profile on the same bins is small; a shifted copy is 0
    ref = de.FreeEnergyProfile(edges, f_exact, np.zeros(12), p_exact / p_exact.sum(),
                               np.zeros(12, int), KT, "min")
    assert de.profile_rmse(prof, ref)["rmse_kt"] < 0.05
    shifted = de.FreeEnergyProfile(edges, f_exact + 3.0, np.zeros(12), ref.population,
                                   ref.counts, KT, "min")
    assert de.profile_rmse(shifted, ref)["rmse_kt"] == pytest.approx(0.0, abs=1e-12)
    # unweighted samples are off by the known amount (q is wider than p)
    plain = de.free_energy_profile(x, None, bins=12, range=(-3, 3), n_bootstrap=0)
    assert de.profile_rmse(plain, ref)["rmse_kt"] > 0.5


def test_profile_mean_alignment_missing_bins_and_errors():
    vals = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    prof = de.free_energy_profile(vals, bins=4, range=(0, 1), align="mean", n_bootstrap=0)
    ok = np.isfinite(prof.f_kt)
    assert (prof.population[ok] * prof.f_kt[ok]).sum() == pytest.approx(0.0, abs=1e-12)
    assert not np.isfinite(prof.f_kt[1])            # bin [0.25, 0.5) is empty
    full = de.free_energy_profile(np.linspace(0, 1, 40), bins=4, range=(0, 1), n_bootstrap=0)
    assert de.profile_rmse(prof, full)["n_missing"] == 1
    with pytest.raises(ValueError, match="differ"):
        de.free_energy_profile(vals, np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        de.free_energy_profile(vals, -np.ones(6))
    with pytest.raises(ValueError, match="align"):
        de.free_energy_profile(vals, align="max")
    with pytest.raises(ValueError, match="temperature"):
        de.free_energy_profile(vals, temperature=-1.0)


def test_collective_variable_phi_psi_and_callable():
    from openmm_diffenergy.alanine import build_alanine_dipeptide

    top, pos = build_alanine_dipeptide(phi=-70.0, psi=140.0)
    phi = de.collective_variable(pos[None], "phi", top)
    psi = de.collective_variable(pos, "psi", top)
    assert math.degrees(phi[0]) == pytest.approx(-70.0, abs=0.5)
    assert math.degrees(psi[0]) == pytest.approx(140.0, abs=0.5)
    d = de.collective_variable(np.stack([pos, pos]), lambda x: x[:, 0, 0])
    assert d.shape == (2,)
    with pytest.raises(ValueError, match="topology"):
        de.collective_variable(pos, "phi")
    with pytest.raises(ValueError, match="NaN"):
        de.collective_variable(np.full((1, 22, 3), np.nan), lambda x: x[:, 0, 0])


# --------------------------------------------------------------------------- harmonic pair

V_MODEL = 0.0007        # model variance per subspace dimension, nm^2: Var(x1 - x0) = 2 V
K_BOND = KT / 0.0011    # target: Var(x1 - x0) = kT / k = 0.0011 nm^2 per axis


def pair_model(t_min=0.0):
    gm = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [V_MODEL], length_scale=0.05)
    gm.t_min = t_min
    return gm


def pair_system(k=K_BOND):
    return bonded_pair(k)


def test_potential_forces_of_a_harmonic_pair():
    x = np.random.default_rng(0).normal(0, 0.1, (5, 2, 3))
    f = de.potential_forces(pair_system(), x)
    assert f.shape == (5, 2, 3)
    np.testing.assert_allclose(f[:, 1], -K_BOND * (x[:, 1] - x[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(f[:, 0], -f[:, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="3 atoms per frame but the System"):
        de.potential_forces(pair_system(), np.zeros((2, 3, 3)))


def distance(x):
    return np.linalg.norm(x[:, 1] - x[:, 0], axis=-1)


def chi_profile(edges, var):
    """Exact -ln P_b of |x1 - x0| when each axis of x1 - x0 is N(0, var)."""
    p = np.diff(stats.chi(3, scale=math.sqrt(var)).cdf(edges))
    f = -np.log(p / p.sum())
    return f - f.min(), p / p.sum()


def check_target_profile(res, name="d", tol=0.12):
    prof = res.profiles[name]
    f_exact, pop = chi_profile(prof.edges, KT / K_BOND)
    ok = pop > 0.03
    err = np.abs(prof.f_kt[ok] - prof.f_kt[ok].mean() - (f_exact[ok] - f_exact[ok].mean()))
    assert np.all(err < 4 * np.nan_to_num(prof.error_kt[ok], nan=1.0) + tol), err


def test_sample_with_likelihood_is_exact_for_a_gaussian_mixture():
    gm = de.particle_mixture(3, 2, seed=1, length_scale=0.3)
    gm.t_min = 1e-3
    res = de.sample_with_likelihood(gm, 12, batch_size=6, seed=3, rtol=1e-6, atol=1e-6,
                                    dtype=torch.float64)
    exact = -gm.log_prob(res.x, gm.t_min)
    assert res.x.shape == (12, 3, 3)
    # 2e-3 nats: the N(0, I) prior differs from the exact p_T by terms of order
    # alpha(T)^2 |mean / s|^2 ~ 1e-3 here (alpha(1) = 0.0066 for the default VP-SDE)
    assert res.nll.numpy() == pytest.approx(exact.numpy(), abs=2e-3)
    rk4 = de.sample_with_likelihood(gm, 6, solver="rk4", steps=60, seed=3,
                                    dtype=torch.float64)
    assert rk4.nll.numpy() == pytest.approx(-gm.log_prob(rk4.x, gm.t_min).numpy(), abs=5e-3)
    # x is centred and the ODE sample positions are those the density belongs to
    assert rk4.x.mean(1).abs().max() < 1e-12


class BrokenMixture(de.GaussianMixtureEnergy):
    """A 2-D mixture whose score is NaN where y_0 > 1: the solver fails on those paths."""

    def forward(self, y, t):
        nan_where = torch.where(y[:, 0] > 1.0, torch.full_like(y[:, 0], float("nan")),
                                torch.zeros_like(y[:, 0]))
        return super().forward(y, t) + nan_where * y[:, 0]


def test_sample_with_likelihood_isolates_failing_samples():
    gm = de.mixture_2d()
    broken = BrokenMixture.from_config(gm.config())
    res = de.sample_with_likelihood(broken, 32, batch_size=16, seed=0, dtype=torch.float64,
                                    rtol=1e-6, atol=1e-6)
    bad = ~torch.isfinite(res.nll)
    assert res.method["failed"] == int(bad.sum()) > 0
    assert torch.isnan(res.x[bad]).all() and torch.isfinite(res.x[~bad]).all()
    # the samples that survived are exact: their log q is the mixture's
    good = res.nll[~bad].numpy()
    assert good == pytest.approx(-gm.log_prob(res.x[~bad], 0.0).numpy(), abs=2e-3)


def test_reweight_iid_harmonic_pair_matches_target():
    gm = pair_model()
    res = de.reweight_iid(gm, pair_system(), n=600, temperature=300.0,
                          cvs={"d": distance}, ranges={"d": (0.0, 0.12)}, bins=12,
                          n_bootstrap=50, batch_size=300, rtol=1e-6, atol=1e-6,
                          progress=False)
    assert res.x.shape == (600, 2, 3) and res.info["n_dropped"] == 0
    # log q is the exact density of the samples
    assert -res.proposal == pytest.approx(gm.log_prob(torch.as_tensor(res.x)).numpy(),
                                          abs=1e-3)
    s_q, s_p = math.sqrt(2 * V_MODEL), math.sqrt(KT / K_BOND)
    assert res.ess == pytest.approx(exact_ess(s_q, s_p, 3), abs=0.08)
    check_target_profile(res)
    # the unweighted profile is the model's own (wider) distribution, not the target
    plain = res.proposal_profiles["d"]
    assert np.average(res.cvs["d"] ** 2, weights=res.weights) == pytest.approx(
        3 * s_p ** 2, rel=0.1)
    assert plain.population[-4:].sum() > res.profiles["d"].population[-4:].sum()


def test_reweight_md_with_exact_frames_matches_target():
    gm = pair_model()
    frames = gm.sample(3000, torch.Generator().manual_seed(5))
    res = de.reweight_md(gm, pair_system(), frames=frames, temperature=300.0,
                         cvs={"d": distance}, ranges={"d": (0.0, 0.12)}, bins=12,
                         n_bootstrap=50, block_size=1, progress=False)
    assert res.ess == pytest.approx(exact_ess(math.sqrt(2 * V_MODEL),
                                              math.sqrt(KT / K_BOND), 3), abs=0.05)
    check_target_profile(res, tol=0.08)
    # a condition restricts the target: only pairs closer than 0.04 nm keep weight
    cut = de.reweight_md(gm, pair_system(), frames=frames, cvs={"d": distance},
                         condition=lambda x: distance(x) < 0.04, n_bootstrap=0,
                         progress=False)
    assert cut.weights[res.cvs["d"] >= 0.04].sum() == 0.0
    assert cut.info["condition_fraction"] == pytest.approx((res.cvs["d"] < 0.04).mean())


def test_reweight_md_denoised_frames_recover_the_ess():
    # the model is the target itself, read at t_min = 0.14, where the diffusion noise
    # (sigma^2 s^2 = 0.2 x the target variance) has widened it; frames are exact draws
    # of exp(-E(x, t_min)). The denoising step takes the widening off with exact weights.
    v_target = KT / K_BOND / 2          # per subspace dimension, nm^2
    gm = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [v_target], length_scale=0.05)
    gm.t_min = 0.14
    t = torch.tensor(gm.t_min, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x0 = gm.sample(3000, g)
    frames = gm.sde.alpha(t) * x0 + gm.sde.sigma(t) * 0.05 * de.centre(
        torch.randn(3000, 6, generator=g, dtype=torch.float64), 2).reshape(3000, 2, 3)
    kw = dict(frames=frames, temperature=300.0, cvs={"d": distance},
              ranges={"d": (0.0, 0.12)}, bins=12, n_bootstrap=50, block_size=1,
              progress=False)
    plain = de.reweight_md(gm, pair_system(), **kw)
    stepped = de.reweight_md(gm, pair_system(), denoise=True, **kw)
    s_q = math.sqrt(2 * (float(gm.sde.alpha(t)) ** 2 * v_target
                         + float(gm.sde.sigma2(t)) * 0.05 ** 2))
    assert plain.ess == pytest.approx(exact_ess(s_q, math.sqrt(KT / K_BOND), 3), abs=0.05)
    assert stepped.ess > 0.97 > plain.ess + 0.1     # measured 0.99 vs 0.77
    assert stepped.info["denoised"] and stepped.info["denoise_failed"] == 0
    check_target_profile(stepped, tol=0.08)


def test_learned_md_runs_and_reweights():
    gm = pair_model(t_min=1e-3)
    start = np.array([[0.0, 0.0, 0.0], [0.03, 0.0, 0.0]])
    res = de.reweight_md(gm, pair_system(), positions=start, n_frames=30, save_interval=0.05,
                         timestep=0.002, n_replicas=2, cvs={"d": distance}, bins=8,
                         n_bootstrap=10, progress=False)
    assert res.x.shape == (60, 2, 3)
    assert [r["stopped"] for r in res.info["replicas"]] == [None, None]
    assert 0.0 < res.ess <= 1.0
    assert res.proposal == pytest.approx(gm.energy(torch.as_tensor(res.x), 1e-3).numpy(),
                                         rel=1e-5)


def test_learned_md_blow_up_is_reported_not_raised():
    gm = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [1e-6], length_scale=0.05)
    start = np.array([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0]])
    with pytest.warns(RuntimeWarning, match="stopped"):
        runs = de.run_learned_md(gm, pair_system(), start, n_frames=50, save_interval=0.5,
                                 timestep=0.5, backend="pythonforce")
    assert runs[0]["stopped"] is not None
    assert len(runs[0]["frames"]) < 50 and np.isfinite(runs[0]["frames"]).all()
    # replicas in one Context stop together; unbatched, each has its own Context
    for batch in (True, False):
        with pytest.warns(RuntimeWarning, match="stopped"):
            runs = de.run_learned_md(gm, pair_system(), start, n_frames=50, save_interval=0.5,
                                     timestep=0.5, backend="pythonforce", n_replicas=2,
                                     batch=batch)
        assert all(r["stopped"] is not None and len(r["frames"]) < 50 for r in runs)


def test_batched_replicas_are_independent_copies():
    gm = pair_model(t_min=1e-3)
    start = np.array([[[0.0, 0.0, 0.0], [0.03, 0.0, 0.0]],
                      [[1.0, 0.0, 0.0], [1.0, 0.03, 0.0]],
                      [[0.0, 2.0, 0.0], [0.0, 2.0, 0.03]]])
    runs = de.run_learned_md(gm, pair_system(), start, n_frames=40, save_interval=0.05,
                             timestep=0.002, n_replicas=3, friction=20.0)
    assert len(runs) == 3 and all(r["stopped"] is None for r in runs)
    for r, run in enumerate(runs):
        assert run["frames"].shape == (40, 2, 3)
        # each replica continues from its own start (copies are not mixed up) ...
        assert np.abs(run["frames"][0].mean(0) - start[r].mean(0)).max() < 0.05
    # ... and keeps a bond of the model's length: <d^2> = 3 kT/k_model
    d2 = np.concatenate([(distance(run["frames"][10:]) ** 2) for run in runs])
    assert d2.mean() == pytest.approx(3 * 2 * V_MODEL, rel=0.35)
    # read at t = 0.3 the energy is the diffused one: variance alpha^2 V + sigma^2 s^2
    t = torch.tensor(0.3, dtype=torch.float64)
    v_t = float(gm.sde.alpha(t) ** 2 * V_MODEL + gm.sde.sigma2(t) * gm.length_scale ** 2)
    late = de.run_learned_md(gm, pair_system(), start, n_frames=40, save_interval=0.05,
                             timestep=0.002, n_replicas=3, friction=20.0, t_min=0.3)
    d2 = np.concatenate([(distance(run["frames"][10:]) ** 2) for run in late])
    assert v_t > 1.8 * V_MODEL
    assert d2.mean() == pytest.approx(3 * 2 * v_t, rel=0.35)


def test_reweighting_input_errors():
    gm = pair_model()
    three = openmm.System()
    for _ in range(3):
        three.addParticle(1.0)
    with pytest.raises(ValueError, match="atoms"):
        de.reweight_iid(gm, three, n=4, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        de.reweight_iid(gm, pair_system(), n=4, temperature=-300.0, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        de.reweight_md(gm, pair_system(), progress=False)
    with pytest.raises(ValueError, match="atoms per frame"):
        de.reweight_md(gm, pair_system(), frames=np.zeros((4, 3, 3)), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        de.potential_energies(pair_system(), np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        de.potential_energies(pair_system(), np.zeros((2, 2, 2)))


# --------------------------------------------------------------------------- BAR / MBAR

def external_harmonic(n, k, name="k"):
    system = openmm.System()
    force = openmm.CustomExternalForce(f"0.5*{name}*(x^2+y^2+z^2)")
    force.addGlobalParameter(name, k)
    for i in range(n):
        system.addParticle(10.0)
        force.addParticle(i, [])
    system.addForce(force)
    return system


def test_bar_mbar_on_exact_gaussian_energies():
    """Samples of U_lambda = (1-l) k_a r^2/2 + l k_b r^2/2 drawn exactly; d = 6."""
    rng = np.random.default_rng(2)
    ka, kb, d = 100.0, 900.0, 6
    lambdas = np.linspace(0, 1, 5)
    ua, ub, state = [], [], []
    for i, lam in enumerate(lambdas):
        k = (1 - lam) * ka + lam * kb
        x = rng.normal(0.0, math.sqrt(KT / k), size=(2000, d))
        r2 = (x ** 2).sum(1)
        ua.append(0.5 * ka * r2)
        ub.append(0.5 * kb * r2)
        state.append(np.full(2000, i))
    res = de.free_energy_from_energies(np.concatenate(ua), np.concatenate(ub),
                                       np.concatenate(state), lambdas, 300.0)
    exact = 0.5 * d * math.log(kb / ka)     # -ln(Z_b/Z_a) for harmonic oscillators
    assert 0 < res.error_kt < 0.1 and 0 < res.error_bar_kt < 0.1
    assert abs(res.delta_f_kt - exact) < 4 * res.error_kt
    assert abs(res.delta_f_bar_kt - exact) < 4 * res.error_bar_kt
    assert res.delta_f_kj_per_mol == pytest.approx(res.delta_f_kt * KT)
    assert min(res.info["neighbour_overlap"]) > 0.05       # neighbouring states overlap
    assert sum(res.info["bar_steps_kt"]) == pytest.approx(res.delta_f_bar_kt)
    # a constant offset of U_b by 5000 kT shifts Delta F by exactly that (MBAR and BAR)
    off = de.free_energy_from_energies(np.concatenate(ua), np.concatenate(ub) + 5000 * KT,
                                       np.concatenate(state), lambdas, 300.0)
    assert off.delta_f_kt == pytest.approx(res.delta_f_kt + 5000, abs=1e-3)
    assert off.delta_f_bar_kt == pytest.approx(res.delta_f_bar_kt + 5000, abs=1e-3)
    with pytest.raises(ValueError, match="lambdas"):
        de.free_energy_from_energies([0.0], [0.0], [0], [0.0, 0.5])
    with pytest.raises(ValueError, match="same shape"):
        de.free_energy_from_energies([0.0, 1.0], [0.0], [0, 1], [0.0, 1.0])


def test_lambda_free_energy_harmonic_openmm_systems():
    n, ka, kb = 4, 200.0, 800.0
    res = de.lambda_free_energy(external_harmonic(n, ka, "ka"), external_harmonic(n, kb, "kb"),
                                np.zeros((n, 3)) + 0.01, lambdas=[0.0, 0.5, 1.0],
                                n_frames=300, save_interval=0.2, timestep=0.004,
                                friction=5.0, equilibration=2.0, progress=False)
    exact = 1.5 * n * math.log(kb / ka)
    assert all(s["stopped"] is None for s in res.info["states"])
    assert abs(res.delta_f_kt - exact) < 4 * res.error_kt + 0.05
    assert abs(res.delta_f_bar_kt - exact) < 4 * res.error_bar_kt + 0.05
    assert res.error_kt < 0.3


def test_lambda_free_energy_learned_vs_classical_pair():
    """Model N(0, V) on the pair's subspace vs a harmonic bond: both Gaussian.

    ``Z_learned = int exp(-E(x/s)) dx`` over the relative coordinate with E the
    normalized -log p~ of y = x/s, so ``Z_learned = s^3``, and the bond gives
    ``Z_b = (2 pi kT / k)^(3/2) / 2^(3/2)`` on the same orthonormal subspace coordinate.
    """
    gm = pair_model(t_min=0.0)
    s = gm.length_scale
    res = de.lambda_free_energy(gm, pair_system(), np.array([[0, 0, 0], [0.03, 0, 0.0]]),
                                lambdas=[0.0, 0.5, 1.0], n_frames=150, save_interval=0.1,
                                timestep=0.002, friction=5.0, equilibration=1.0,
                                backend="pythonforce", progress=False)
    # the subspace coordinate z = (x1 - x0)/sqrt(2) has variance kT/(2k) per axis under u
    log_zb = 1.5 * math.log(2 * math.pi * KT / (2 * K_BOND))
    exact = -(log_zb - 3 * math.log(s))
    assert abs(res.delta_f_kt - exact) < 4 * res.error_kt + 0.1


def test_lambda_free_energy_errors():
    gm = pair_model()
    with pytest.raises(ValueError, match="System"):
        de.lambda_free_energy(gm, gm, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="particle counts"):
        de.lambda_free_energy(external_harmonic(2, 1.0), external_harmonic(3, 1.0),
                              np.zeros((2, 3)))
    with pytest.raises(ValueError, match="global parameter"):
        de.lambda_free_energy(external_harmonic(2, 1.0), external_harmonic(2, 2.0),
                              np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lambdas"):
        de.lambda_free_energy(external_harmonic(2, 1.0), external_harmonic(2, 1.0),
                              np.zeros((2, 3)), lambdas=[0.0, 0.7])


@pytest.mark.slow
def test_reweighting_benchmark_quick(tmp_path):
    """The benchmark runs end to end at tiny sizes and writes every key the README quotes."""
    import json

    from _helpers import load

    bench = load("benchmarks/ala2_reweighting.py")
    bench.main(["--quick", "--out", str(tmp_path / "r.json"), "--plots", str(tmp_path / "p")])
    with open(tmp_path / "r.json") as fh:
        data = json.load(fh)
    for key in ("ess_iid", "ess_md", "phi_fe_rmse_kt_iid", "phi_fe_rmse_kt_md",
                "spearman_learned_vs_classical", "slope_learned_vs_classical_kt",
                "delta_f_bar_kt", "delta_f_bar_kt_uncertainty", "n_iid", "n_md", "n_compare",
                "hardware", "gates", "ess_iid_annealed", "ess_md_annealed",
                "phi_fe_rmse_kt_iid_annealed", "phi_fe_rmse_kt_md_annealed", "gates_annealed"):
        assert key in data, key
    assert data["iid_fold"] is False and data["n_iid"] > 0 and "iid_error" not in data
    assert "md_error" not in data and data["n_md_annealed"] > 0
    assert data["n_iid_annealed"] == data["n_iid"] + data["iid_denoise_failed"]
    assert set(data["gates"]) == {"ess_iid_ge_0.01", "phi_fe_rmse_kt_iid_le_0.5",
                                  "phi_fe_rmse_kt_md_le_0.5",
                                  "spearman_learned_vs_classical_ge_0.8"}
    assert len(list((tmp_path / "p").glob("*.png"))) == 4


def test_seed_zero_is_reproducible():
    """OpenMM reads an integrator seed of 0 as "random"; the package maps it to a fixed one."""
    gm = pair_model(t_min=1e-3)
    start = np.array([[0.0, 0.0, 0.0], [0.03, 0.0, 0.0]])
    kw = dict(n_frames=5, save_interval=0.01, timestep=0.002, seed=0)
    a, b = (de.run_learned_md(gm, pair_system(), start, **kw)[0]["frames"] for _ in range(2))
    np.testing.assert_array_equal(a, b)
    other = de.run_learned_md(gm, pair_system(), start, **dict(kw, seed=1))[0]["frames"]
    assert np.abs(other - a).max() > 1e-6
