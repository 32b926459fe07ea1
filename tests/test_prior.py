"""FeaturePrior: graph features, chirality, diffused statistics, and its place in MoleculeEnergy."""
import math

import pytest
import torch

import openmm_diffenergy as de
from openmm_diffenergy.models.prior import FeaturePrior, graph_features

# a tetrahedral centre (atom 0) with four different neighbours, one of them bonded on
TETRA = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0],
                      [1.0, -1.0, -1.0], [2.0, 2.0, 1.5]], dtype=torch.float64) * 0.5
BONDS = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5)]


def test_graph_features_of_a_branched_molecule():
    pairs, centres = graph_features(BONDS, 6)
    # 5 bonds; 1-3 pairs: 6 around atom 0 and 1 through atom 1 (0-5)
    assert len(pairs) == 12 and len(set(pairs)) == 12
    assert all(i < j for i, j in pairs)
    assert (0, 5) in pairs and (2, 5) not in pairs
    assert centres == [(0, 1, 2, 3)]
    with pytest.raises(ValueError, match="bad bond"):
        graph_features([(0, 9)], 6)


def _data(n, gen, mirror=False):
    x = TETRA + 0.05 * torch.randn(n, 6, 3, generator=gen, dtype=torch.float64)
    if mirror:
        x = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    return (x - x.mean(1, keepdim=True)).reshape(n, -1)


def test_signed_volume_flips_under_a_mirror_image(gen):
    pairs, centres = graph_features(BONDS, 6)
    prior = FeaturePrior.fit(_data(200, gen), 6, pairs, centres, de.VPSDE(), n_grid=4,
                             n_samples=256).double()
    y = _data(5, gen)
    ym = y.reshape(5, 6, 3) * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    f, fm = prior.features(y), prior.features(ym.reshape(5, -1))
    torch.testing.assert_close(fm[:, :12], f[:, :12])           # distances: the same
    torch.testing.assert_close(fm[:, 12:], -f[:, 12:])          # volumes: sign flipped
    t = torch.full((5,), 0.001, dtype=torch.float64)
    # fitted to one hand, the prior prefers it by several kT at small t (gains 0.3)
    assert (prior(ym.reshape(5, -1), t) - prior(y, t) > 5).all()


def test_fitted_statistics_match_the_exact_diffused_ones(gen):
    # at t = 0 the statistics are the data's own; at t = 1, y_i - y_j is almost pure noise
    # with variance 2 sigma^2 per axis, so d ~ sqrt(2) sigma chi_3 (mean 2 sqrt(2/pi) sqrt(2)
    # sigma), and the signed volume has mean ~ alpha^3 * its data mean.
    sde = de.VPSDE()
    pairs, centres = graph_features(BONDS, 6)
    y0 = _data(2000, gen)
    prior = FeaturePrior.fit(y0, 6, pairs, centres, sde, n_grid=3, n_samples=20000).double()
    f0 = prior.features(y0)
    torch.testing.assert_close(prior.mean[0], f0.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(1 / prior.inv_var[0], f0.var(0), rtol=0.1, atol=1e-5)
    s1 = float(sde.sigma(torch.tensor(1.0, dtype=torch.float64)))
    chi3 = 2 * math.sqrt(2 / math.pi)
    torch.testing.assert_close(prior.mean[-1, :12], torch.full((12,), math.sqrt(2) * s1 * chi3,
                                                                 dtype=torch.float64),
                               rtol=0.03, atol=0)
    # statistics are interpolated on the grid t_k = (k/2)^2: exact at t = 1/4
    mean, inv_var = prior.statistics(torch.tensor([0.25], dtype=torch.float64))
    torch.testing.assert_close(mean[0], prior.mean[1])
    torch.testing.assert_close(inv_var[0], prior.inv_var[1])


def test_bad_tables_are_refused():
    pairs, centres = graph_features(BONDS, 6)
    with pytest.raises(ValueError, match="shape"):
        FeaturePrior(6, pairs, centres, torch.zeros(3, 5), torch.ones(3, 5), de.VPSDE())
    with pytest.raises(ValueError, match="positive variances"):
        FeaturePrior(6, pairs, centres, torch.zeros(3, 13), torch.zeros(3, 13), de.VPSDE())
    with pytest.raises(ValueError, match="bad feature atoms"):
        FeaturePrior(6, [(0, 7)], [], torch.zeros(3, 1), torch.ones(3, 1), de.VPSDE())


def test_molecule_energy_with_a_prior_saves_loads_and_exports(tmp_path, gen):
    from openmm import unit

    pairs, centres = graph_features(BONDS, 6)
    sde = de.VPSDE()
    prior = FeaturePrior.fit(_data(100, gen), 6, pairs, centres, sde, n_grid=5, n_samples=64)
    model = de.MoleculeEnergy(6, [(2, 0, 1, 5)], hidden=16, layers=2, sde=sde, seed=0,
                              length_scale=0.1, prior=prior.config())
    with torch.no_grad():
        model.prior.log_gain.add_(0.2)            # a trained gain must survive the file
    path = str(tmp_path / "m.pt")
    de.save_model(model, path)
    back = de.load_model(path)
    x = (TETRA * 0.1).expand(3, 6, 3).float() + 0.002 * torch.randn(3, 6, 3, generator=gen)
    torch.testing.assert_close(back.energy(x, 0.01), model.energy(x, 0.01))
    # the exported force carries the prior: kT * E(x, t_min) in kJ/mol
    import openmm

    system = openmm.System()
    for _ in range(6):
        system.addParticle(12.0)
    de.add_learned_force(system, back, temperature=300 * unit.kelvin, force_group=0)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x[0].double().numpy())
    e = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    kt = de.kt_kj_per_mol(300 * unit.kelvin)
    assert e == pytest.approx(kt * float(back.energy(x[:1], back.t_min)), rel=1e-5)


def test_fit_prior_from_positions_in_nm(gen):
    from openmm_diffenergy.models.prior import fit_prior

    x = (TETRA * 0.1 + 0.003 * torch.randn(50, 6, 3, generator=gen, dtype=torch.float64)) + 2.0
    cfg = fit_prior(x, BONDS, 0.1, de.VPSDE(), n_grid=3, n_samples=64)
    assert len(cfg["pairs"]) == 12 and len(cfg["centres"]) == 1
    assert torch.tensor(cfg["mean"]).shape == (3, 13)
    # t = 0: the mean bond 0-1 length in model units (nm / 0.1), translation removed
    bond = (x[:, 0] - x[:, 1]).norm(dim=-1).mean() / 0.1
    assert cfg["mean"][0][cfg["pairs"].index([0, 1])] == pytest.approx(float(bond), rel=0.02)
    with pytest.raises(ValueError, match="at least one bond"):
        fit_prior(x, [], 0.1, de.VPSDE())
    with pytest.raises(ValueError, match=r"\(F, N, 3\)"):
        fit_prior(x[0], BONDS, 0.1, de.VPSDE())


def test_time_dependent_gains(tmp_path, gen):
    # log g_f(t) = log g_f + sum_k c_fk s_k^2 / (sigma^2 + s_k^2): exact at t = 0 (basis 1)
    # and t = 1 (basis s^2 / (1 + s^2)); survives save/load; constant gains when no scales
    pairs, centres = graph_features(BONDS, 6)
    sde = de.VPSDE()
    base = FeaturePrior.fit(_data(100, gen), 6, pairs, centres, sde, n_grid=5, n_samples=64)
    assert base.gain_coeffs is None and "gain_coeffs" not in base.state_dict()
    cfg = dict(base.config(), gain_scales=[0.05])
    model = de.MoleculeEnergy(6, [(2, 0, 1, 5)], hidden=16, layers=2, sde=sde, seed=0,
                              length_scale=0.1, prior=cfg)
    with torch.no_grad():
        model.prior.gain_coeffs.fill_(1.0)
    p = model.prior
    for t, basis in ((0.0, 1.0), (1.0, 0.0025 / (float(sde.sigma2(torch.tensor(1.0))) + 0.0025))):
        _, w = p.weights(torch.tensor([t], dtype=torch.float64))
        mean, inv_var = p.statistics(torch.tensor([t], dtype=torch.float64))
        expected = inv_var * 0.3 * math.exp(basis) * float(sde.alpha(torch.tensor(t))) ** 2
        torch.testing.assert_close(w.float(), expected.float(), rtol=1e-5, atol=1e-8)
    path = str(tmp_path / "g.pt")
    de.save_model(model, path)
    back = de.load_model(path)
    x = (TETRA * 0.1).expand(3, 6, 3).float() + 0.002 * torch.randn(3, 6, 3, generator=gen)
    torch.testing.assert_close(back.energy(x, 0.001), model.energy(x, 0.001))
    with pytest.raises(ValueError, match="gain_scales"):
        FeaturePrior(6, pairs, centres, base.mean, 1 / base.inv_var, sde, gain_scales=[0.0])


def test_init_from_keeps_new_parameters_at_their_initial_values(tmp_path, gen):
    from openmm_diffenergy.training import init_from

    pairs, centres = graph_features(BONDS, 6)
    sde = de.VPSDE()
    cfg = FeaturePrior.fit(_data(100, gen), 6, pairs, centres, sde, n_grid=5,
                           n_samples=64).config()
    kw = dict(hidden=16, layers=2, sde=sde, length_scale=0.1)
    old = de.MoleculeEnergy(6, [(2, 0, 1, 5)], seed=0, prior=cfg, **kw)
    path = de.save_model(old, str(tmp_path / "old.pt"))
    new = de.MoleculeEnergy(6, [(2, 0, 1, 5)], seed=1, prior=dict(cfg, gain_scales=[0.05]),
                            **kw)
    assert init_from(new, path) == ["prior.gain_coeffs"]
    x = (TETRA * 0.1).expand(3, 6, 3).float() + 0.002 * torch.randn(3, 6, 3, generator=gen)
    torch.testing.assert_close(new.energy(x, 0.01), old.energy(x, 0.01))   # coeffs start at 0
    with pytest.raises(ValueError, match="cannot start from"):
        init_from(de.MoleculeEnergy(6, [(2, 0, 1, 5)], seed=0, prior=cfg, hidden=8, layers=2,
                                    sde=sde, length_scale=0.1), path)
    with pytest.raises(ValueError, match="cannot start from"):   # no prior: other inputs
        init_from(de.MoleculeEnergy(6, [(2, 0, 1, 5)], seed=0, **kw), path)
