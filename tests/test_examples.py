"""The examples and benchmark scripts run end to end at small settings."""
import json
import os

import numpy as np
import pytest

from _helpers import ROOT, load


def test_gmm_1d_example(tmp_path):
    out = tmp_path / "gmm.png"
    figures = load("examples/gmm_1d.py").main(
        ["--points", "60", "--flow-steps", "40", "--path-steps", "60", "--samples", "50",
         "--sample-steps", "100", "--out", str(out), "--json", str(tmp_path / "f.json")])
    assert out.stat().st_size > 10000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # small settings, still well inside a 0.05-nat error
    assert figures["flow"]["mean_abs_err"] < 0.01
    assert figures["diffusion_path"]["mean_abs_err"] < 0.05
    assert json.loads((tmp_path / "f.json").read_text())["flow"]["steps"] == 40


@pytest.mark.slow
def test_likelihood_benchmark_quick(tmp_path):
    out = tmp_path / "la.json"
    results, targets = load("benchmarks/likelihood_accuracy.py").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["quick"] is True and set(data["targets"]) == set(targets)
    assert data["results"]["particles_22"]["dof"] == 63
    assert targets["diffusion_1d_mean_le_0.05"]


@pytest.mark.slow
def test_md_throughput_benchmark_quick(tmp_path):
    out = tmp_path / "md.json"
    res, targets = load("benchmarks/md_throughput.py").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("torchforce_steps_per_s", "pythonforce_steps_per_s", "bare_loop_evals_per_s"):
        assert data[key] > 0
    assert set(data["replica_steps_per_s"]) == {"1", "8", "64"}


@pytest.mark.slow
def test_demo_seeds_benchmark_quick(tmp_path):
    out = tmp_path / "ds.json"
    res = load("benchmarks/demo_seeds.py").main(
        ["--seeds", "0", "1", "--n-iid", "8", "--md-ps", "0.5", "--replicas", "2",
         "--n-compare", "8", "--anneal-stages", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 1] and len(data["runs"]) == 2
    for key, s in data["spread"].items():
        values = [r[key] for r in data["runs"]]
        assert s["min"] == min(values) and s["max"] == max(values)
        assert s["mean"] == pytest.approx(sum(values) / 2)
    # different seeds give different MD, so the MD figures differ between the runs
    assert data["runs"][0]["ess_md"] != data["runs"][1]["ess_md"]
    assert res["spread"]["ess_md"]["std"] > 0


def _readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return [b.split("```")[0] for b in text.split("```python\n")[1:]]


def test_readme_python_snippet_runs():
    block = _readme_blocks()[0]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    gm, x, res = namespace["gm"], namespace["x"], namespace["res"]
    assert (res.nll + gm.log_prob(x)).abs().mean() < 1e-2


@pytest.mark.slow
def test_every_readme_python_snippet_runs(monkeypatch):
    monkeypatch.chdir(ROOT)                  # the snippets name models/ by relative path
    blocks = _readme_blocks()
    assert len(blocks) >= 5
    for k, block in enumerate(blocks[1:], 1):
        exec(compile(block, f"README.md python block {k}", "exec"), {})


def test_reweight_to_amber_example(tmp_path, capsys):
    out = tmp_path / "rw.png"
    md, iid = load("examples/reweight_to_amber.py").main(
        ["--md-ps", "0.5", "--replicas", "1", "--n-iid", "3", "--out", str(out)])
    assert len(md.x) == 5 and 1 <= len(iid.x) <= 3
    assert 0 < md.ess <= 1 and 0 < iid.ess <= 1
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "Kish ESS" in capsys.readouterr().out


@pytest.mark.slow
def test_ala2_quality_benchmark_quick(tmp_path):
    out = tmp_path / "q.json"
    res, targets = load("benchmarks/ala2_quality.py").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("aa_js_iid", "aa_js_md", "cg_js_iid", "cg_js_md", "aa_bond_w1_nm",
                "js_reference_split_half"):
        assert key in data and np.isfinite(data[key])
    assert 0.0 <= data["aa"]["aa_md_intact_fraction"] <= 1.0
    assert data["aa"]["md"]["replicas"] == 2 and data["aa"]["stability"]["replicas"] == 1
    assert 0.0 <= data["aa_stability_intact_fraction"] <= 1.0
    assert "mirror-folded" in data["aa"]["iid_sampler"]
    assert "MALA corrector" in data["cg"]["iid_sampler"]
    assert np.isfinite(data["aa_js_iid_unfolded"])
    for kind in ("aa", "cg"):
        assert np.isfinite(data[f"{kind}_js_iid_sde"])
        assert 0 < data[kind]["corrector"]["acceptance"] <= 1


def test_add_to_openmm_script_example(tmp_path):
    import mdtraj
    import torch

    import openmm_diffenergy as de
    out = tmp_path / "mixed.dcd"
    res = load("examples/add_to_openmm_script.py").main(
        ["--steps", "20", "--report-every", "10", "--weight", "0.1", "--out", str(out)])
    from openmm_diffenergy.alanine import build_alanine_dipeptide
    top = mdtraj.Topology.from_openmm(build_alanine_dipeptide()[0])
    traj = mdtraj.load(str(out), top=top)
    assert traj.n_frames == 2 and traj.n_atoms == 22      # a frame every 10 steps
    # the learned force group holds exactly w * kT * E(x, t_min) at the final positions
    model = de.load_model(os.path.join(ROOT, "models", "ala2_aa.pt"))
    x = torch.tensor(np.asarray(res["positions_nm"]), dtype=torch.float32)[None]
    expected = 0.1 * de.kt_kj_per_mol(300.0) * model.energy(x, model.t_min).item()
    assert res["learned_kj_mol"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert res["potential_kj_mol"] != pytest.approx(res["learned_kj_mol"], abs=1.0)


def test_cg_md_example(tmp_path):
    res = load("examples/cg_md.py").main(
        ["--steps", "100", "--save-ps", "0.02", "--replicas", "2", "--out-dir", str(tmp_path)])
    assert res["frames"] == 10                       # 100 steps, a frame every 10
    assert res["phi_psi_deg"].shape == (20, 2)       # 10 frames x 2 replicas
    assert np.isfinite(res["phi_psi_deg"]).all()
    assert res["c7eq"] + res["extended"] + res["phi_positive"] == pytest.approx(1.0)
    assert (tmp_path / "cg_md.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cg_md.pdb").exists()
