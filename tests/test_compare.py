"""Energy comparison: correlations, slope, RMSD funnels, decoy ranking, plots."""
import os

import numpy as np
import pytest
import torch

import openmm_diffenergy as de
from _helpers import bonded_pair
from openmm_diffenergy import plots

KT = de.kt_kj_per_mol(300.0)


def test_correlation_known_answers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    y = 2.0 * x + 1.0 + rng.normal(scale=0.01, size=500)
    r = de.correlation(y, x)
    assert r["slope"] == pytest.approx(2.0, abs=0.01)
    assert r["intercept"] == pytest.approx(1.0, abs=0.01)
    assert r["pearson"] > 0.999 and r["spearman"] > 0.999
    # a monotone, non-linear relation: Spearman 1, Pearson below 1
    r2 = de.correlation(np.exp(3 * x), x)
    assert r2["spearman"] == pytest.approx(1.0) and r2["pearson"] < 0.9
    # anti-correlated, and non-finite pairs left out
    r3 = de.correlation(np.append(-x, np.inf), np.append(x, 0.0))
    assert r3["spearman"] == pytest.approx(-1.0) and r3["n_used"] == 500 and r3["n"] == 501
    with pytest.raises(ValueError, match="differ"):
        de.correlation(x, x[:-1])
    with pytest.raises(ValueError, match="constant"):
        de.correlation(np.ones(5), x[:5])
    with pytest.raises(ValueError, match="NaN"):
        de.correlation([np.nan] * 3, [1.0, 2.0, 3.0])


def rotation(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_rmsd_to_reference_is_superposition_invariant():
    rng = np.random.default_rng(1)
    ref = rng.normal(scale=0.3, size=(8, 3))
    moved = ref @ rotation(2).T + np.array([1.0, -2.0, 0.5])
    noisy = ref + rng.normal(scale=0.01, size=ref.shape)
    r = de.rmsd_to_reference(np.stack([moved, noisy, ref]), ref)
    assert r[0] == pytest.approx(0.0, abs=1e-5) and r[2] == pytest.approx(0.0, abs=1e-5)
    assert 0.003 < r[1] < 0.02
    # only the chosen atoms count
    bad = ref.copy()
    bad[0] += 1.0
    assert de.rmsd_to_reference(bad, ref, atom_indices=range(1, 8))[0] == pytest.approx(
        0.0, abs=1e-5)
    with pytest.raises(ValueError, match="atoms"):
        de.rmsd_to_reference(np.zeros((2, 7, 3)), ref)


def test_decoy_ranking():
    rmsd = np.array([0.3, 0.1, 0.2, 0.05])
    good = de.decoy_ranking([3.0, 1.0, 2.0, 0.0], rmsd)
    assert good["picks_lowest_rmsd"] and good["best_index"] == 3
    assert good["rmsd_rank_of_best"] == 1 and good["spearman_energy_rmsd"] == pytest.approx(1.0)
    bad = de.decoy_ranking([0.0, 1.0, 2.0, 3.0], rmsd)
    assert not bad["picks_lowest_rmsd"] and bad["rmsd_rank_of_best"] == 4
    assert bad["rmsd_of_best"] == 0.3 and bad["min_rmsd"] == 0.05
    # a non-finite energy never wins
    assert de.decoy_ranking([np.inf, 1.0, 2.0, 3.0], rmsd)["best_index"] == 1


def harmonic_pair_setup():
    gm = de.GaussianMixtureEnergy(np.zeros((1, 2, 3)), [0.0005], length_scale=0.05)
    return gm, bonded_pair(KT / (2 * 0.0005))    # exp(-u/kT) equals the model's density


def test_compare_energies_exact_model_has_slope_one():
    gm, system = harmonic_pair_setup()
    x = gm.sample(40, torch.Generator().manual_seed(0)).numpy()
    x[:10] *= np.linspace(1.0, 3.0, 10)[:, None, None]      # decoys, stretched
    ref = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    res = de.compare_energies(gm, system, x, temperature=300.0, reference=ref, nll=True,
                              nll_options={"batch_size": 40})
    lc = res.learned_vs_classical
    assert lc["slope"] == pytest.approx(1.0, abs=1e-6)
    assert lc["pearson"] == pytest.approx(1.0, abs=1e-9)
    assert lc["spearman"] == pytest.approx(1.0)
    assert res.nll_vs_classical["slope"] == pytest.approx(1.0, abs=1e-3)
    assert res.classical_kj_per_mol == pytest.approx(res.reduced_classical * KT)
    # the lowest energy is the shortest bond, which is the lowest RMSD to a zero-length pair
    for kind in ("learned", "classical", "nll"):
        assert res.ranking[kind]["picks_lowest_rmsd"]
    with pytest.raises(ValueError, match="atoms"):
        de.compare_energies(gm, system, np.zeros((5, 3, 3)))
    with pytest.raises(ValueError, match="temperature"):
        de.compare_energies(gm, system, x, temperature=-1.0)


class NaNBeyond(de.GaussianMixtureEnergy):
    """The pair model, with a NaN energy where the first coordinate exceeds 1 at t > 0.3:
    finite at t_min, so only the flow solve fails."""

    def forward(self, y, t):
        nan_where = torch.where((y[:, 0] > 1.0) & (t > 0.3),
                                torch.full_like(y[:, 0], float("nan")),
                                torch.zeros_like(y[:, 0]))
        return super().forward(y, t) + nan_where * y[:, 0]


def test_compare_energies_counts_failed_likelihoods():
    gm, system = harmonic_pair_setup()
    broken = NaNBeyond.from_config(gm.config())
    x = gm.sample(12, torch.Generator().manual_seed(1)).numpy()
    x[:3, 0, 0] = 0.2                # y_0 = 4 in model units: NaN scores on those paths
    res = de.compare_energies(broken, system, x, temperature=300.0, reference=x[5] * 0,
                              nll=True, nll_options={"solver": "rk4", "steps": 20})
    assert res.info["nll_failed"] == 3 and np.isnan(res.nll[:3]).all()
    assert res.nll_vs_classical["n"] == 9
    assert res.ranking["nll"]["best_index"] >= 3


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=2000)
    prof = {"a": de.free_energy_profile(a, bins=10, range=(-3, 3), n_bootstrap=5),
            "b": de.free_energy_profile(a + 0.2, bins=10, range=(-3, 3), n_bootstrap=5)}
    phi, psi = rng.uniform(-3, 3, 500), rng.uniform(-3, 3, 500)
    paths = [
        plots.plot_free_energy_profiles(prof, str(tmp_path / "fe.png"), xlabel="x"),
        plots.plot_free_energy_profiles(prof, str(tmp_path / "fe_kj.png"),
                                        energy_unit="kJ/mol", ymax=10.0),
        plots.plot_ramachandran({"md": (phi, psi), "rw": (phi, psi, np.ones(500))},
                                str(tmp_path / "rama.png")),
        plots.plot_energy_scatter(a, 2 * a, str(tmp_path / "scatter.png"),
                                  fit=de.correlation(2 * a, a)),
        plots.plot_funnel(np.abs(a[:50]), {"learned": a[:50] ** 2}, str(tmp_path / "f.png")),
    ]
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 1000
    with pytest.raises(ValueError, match="energy_unit"):
        plots.plot_free_energy_profiles(prof, str(tmp_path / "x.png"), energy_unit="eV")
