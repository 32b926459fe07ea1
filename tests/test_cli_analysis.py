"""``diffenergy demo``, ``reweight`` and ``compare`` end to end on tiny inputs, and their errors."""
import json
import os

import mdtraj
import numpy as np
import pytest

import openmm_diffenergy as de
from openmm_diffenergy.ala2 import load_reference
from openmm_diffenergy.alanine import alanine_system
from openmm_diffenergy.cli import main

from _helpers import ROOT

AA_MODEL = os.path.join(ROOT, "models", "ala2_aa.pt")
CG_MODEL = os.path.join(ROOT, "models", "ala2_cg.pt")
DATA = os.path.join(ROOT, "data", "ala2_vacuum.npz")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Six reference frames as DCD + PDB."""
    d = tmp_path_factory.mktemp("analysis")
    ref = load_reference(DATA)
    traj = mdtraj.Trajectory(ref.xyz[::1000][:6], ref.topology)
    traj[0].save_pdb(str(d / "f.pdb"))
    traj.save_dcd(str(d / "f.dcd"))
    return {"dir": d, "pdb": str(d / "f.pdb"), "dcd": str(d / "f.dcd"), "xyz": traj.xyz}


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"diffenergy {command}: error: "), err
    return err


def test_compare_matches_the_library(frames, tmp_path):
    out = str(tmp_path / "cmp.json")
    assert main(["compare", AA_MODEL, frames["dcd"], "--top", frames["pdb"], "--out", out,
                 "--no-progress"]) == 0
    got = json.loads(open(out).read())
    model = de.load_model(AA_MODEL)
    ref = load_reference(DATA)
    system = alanine_system(ref.topology.to_openmm(), "vacuum", constraints=None)
    want = de.compare_energies(model, system, frames["xyz"], 300.0, reference=frames["xyz"][0])
    # DCD stores float32 angstrom, so the energies agree to the rounding of the positions
    np.testing.assert_allclose(got["learned_kT"], want.learned_kt, rtol=1e-3, atol=0.05)
    np.testing.assert_allclose(got["classical_kj_per_mol"], want.classical_kj_per_mol,
                               rtol=1e-3, atol=0.1)
    assert got["rmsd_nm"][0] == pytest.approx(0.0, abs=1e-4)
    assert (tmp_path / "cmp.png").exists() and (tmp_path / "cmp_funnel.png").exists()


def test_reweight_md_frames_and_iid(frames, tmp_path, capsys):
    out = str(tmp_path / "rw.csv")
    assert main(["reweight", AA_MODEL, "--mode", "md", "--frames", frames["dcd"], "--top",
                 frames["pdb"], "--chirality", "L", "--out", out, "--no-progress"]) == 0
    rows = open(out).read().strip().splitlines()
    assert rows[0] == "sample,log_weight,reduced_energy,energy_kT" and len(rows) == 7
    logw = np.array([float(r.split(",")[1]) for r in rows[1:]])
    assert np.exp(logw).sum() == pytest.approx(1.0, rel=1e-5)
    assert "Kish ESS" in capsys.readouterr().out
    # annealed: the same frames carried on to amber; log w = -u/kT + the last column
    out = str(tmp_path / "ais.csv")
    assert main(["reweight", AA_MODEL, "--mode", "md", "--frames", frames["dcd"], "--top",
                 frames["pdb"], "--out", out, "--no-progress", "--no-png",
                 "--anneal-stages", "3", "--anneal-steps", "2"]) == 0
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert open(out).readline().strip().endswith("log_w_plus_u") and len(table) == 6
    lw = table[:, 3] - table[:, 2]
    norm = lw.max() + np.log(np.exp(lw - lw.max()).sum())
    np.testing.assert_allclose(table[:, 1], lw - norm, atol=1e-5)     # 10 digits in the CSV
    out = str(tmp_path / "iid.json")
    assert main(["reweight", AA_MODEL, "--mode", "iid", "--n", "3", "--out", out,
                 "--no-progress", "--no-png"]) == 0
    got = json.loads(open(out).read())
    assert len(got["nll"]) == 3 and np.isfinite(got["nll"]).all()
    assert 1 / 3 - 1e-9 <= got["ess"] <= 1.0


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--n-iid", "4", "--md-ps", "0.3",
                 "--replicas", "1", "--n-compare", "5", "--anneal-stages", "2",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    for needle in ("ESS", "JS divergence", "Spearman", "annealed"):
        assert needle in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_iid"] >= 1 and summary["md_frames"] == 3
    assert summary["md_frames_annealed"] == 2 and 0 < summary["ess_md_annealed"] <= 1
    assert 0 <= summary["js_md"] <= np.log(2) and 0 <= summary["js_iid"] <= np.log(2)
    traj = mdtraj.load(str(out / "learned_md.dcd"), top=str(out / "learned_md.pdb"))
    assert traj.n_frames == 3 and traj.n_atoms == 22
    for png in ("ramachandran", "phi_profiles", "energy_scatter", "funnel"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, command, needle", [
    (["compare", "missing.pt", "x.pdb"], "compare", "missing.pt"),
    (["reweight", AA_MODEL, "--temperature", "-5"], "reweight", "-5"),
    (["reweight", AA_MODEL, "--out", "w.txt"], "reweight", ".csv or .json"),
    (["reweight", CG_MODEL, "--n", "2", "--out", "w.csv"], "reweight", "atoms"),
    (["reweight", AA_MODEL, "--mode", "iid", "--frames", "a.dcd"], "reweight", "--mode md"),
    (["reweight", AA_MODEL, "--anneal-stages", "-2"], "reweight", "anneal-stages"),
    (["demo", "--n-iid", "0"], "demo", "0"),
    (["demo", "--anneal-stages", "0"], "demo", "anneal-stages"),
])
def test_bad_arguments_give_one_line(argv, command, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err
