"""The ``diffenergy`` command line: every subcommand end to end on tiny inputs, and its errors.

The subcommands run in-process through ``main([...])``; one test runs the installed
console script in a subprocess to prove the entry point works.
"""
import json
import os
import subprocess
import sys

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import unit

import openmm_diffenergy as de
from openmm_diffenergy.ala2 import load_reference
from openmm_diffenergy.cli import COMMANDS, Command, main, register

from _helpers import ROOT

CG_MODEL = os.path.join(ROOT, "models", "ala2_cg.pt")
AA_MODEL = os.path.join(ROOT, "models", "ala2_aa.pt")
CONSOLE = os.path.join(os.path.dirname(sys.executable), "diffenergy")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny reference data (20 frames) and a tiny backbone model trained on them."""
    d = tmp_path_factory.mktemp("cli")
    npz, dcd = str(d / "ref.npz"), str(d / "ref.dcd")
    rc = main(["generate-data", "--ns", "0.01", "--save-ps", "0.5", "--chunk-ps", "5",
               "--equilibrate-ps", "1", "--out", npz, "--trajectory", dcd])
    assert rc == 0
    model = str(d / "bb.pt")
    rc = main(["train", dcd, "--top", str(d / "ref.pdb"), "--mapping", "backbone",
               "--out", model, "--steps", "20", "--hidden", "16", "--layers", "1",
               "--batch-size", "16", "--checkpoint-every", "10", "--no-progress"])
    assert rc == 0
    return {"dir": d, "npz": npz, "dcd": dcd, "pdb": str(d / "ref.pdb"), "model": model}


def _error_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"diffenergy {command}: error: "), err
    return err


def test_generate_data_writes_npz_trajectory_and_png(work):
    ref = load_reference(work["npz"])
    assert ref.xyz.shape == (20, 22, 3)
    traj = mdtraj.load(work["dcd"], top=work["pdb"])
    # DCD stores float32 angstrom: same frames to 1e-5 nm
    np.testing.assert_allclose(traj.xyz, ref.xyz, atol=1e-5)
    png = work["dir"] / "ref.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_writes_model_log_and_resumes(work):
    model = de.load_model(work["model"], model_class="MoleculeEnergy")
    top = mdtraj.load(work["pdb"]).topology
    backbone = top.select("backbone")
    meta = model.metadata
    assert model.n_particles == len(backbone)
    assert meta["particle_selection"] == [int(i) for i in backbone]
    assert meta["temperature"] == 300.0 and meta["training"]["steps"] == 20
    # torsions of the backbone's bond graph, phi and psi among them
    assert len(model.config()["torsions"]) >= 2
    assert (work["dir"] / "bb.png").read_bytes()[:4] == b"\x89PNG"     # the loss curve
    # the same command with more steps resumes from the checkpoint
    rc = main(["train", work["dcd"], "--top", work["pdb"], "--mapping", "backbone",
               "--out", work["model"], "--steps", "30", "--hidden", "16", "--layers", "1",
               "--batch-size", "16", "--checkpoint-every", "10", "--no-progress", "--no-png"])
    assert rc == 0
    log = open(work["model"] + ".log").read()
    assert "resumed from" in log and "at step 20" in log and "diffenergy train" in log
    assert de.load_model(work["model"]).metadata["training"]["steps"] == 30


def test_train_from_npz_with_bead_groups(work, tmp_path, capsys):
    beads = tmp_path / "beads.json"
    beads.write_text(json.dumps([[0, 1, 2, 3, 4, 5], [6, 7, 8], [8, 10, 12], [14, 15, 16, 17]]))
    out = str(tmp_path / "beads.pt")

    def train(hidden, *extra):
        return main(["train", work["npz"], "--beads", str(beads), "--out", out, "--steps", "5",
                     "--hidden", str(hidden), "--layers", "1", "--batch-size", "8",
                     "--no-progress", "--no-png", *extra])

    assert train(8) == 0
    model = de.load_model(out)
    assert model.n_particles == 4 and len(model.metadata["bead_groups"]) == 4
    assert "particle_selection" not in model.metadata
    # a checkpoint written for another architecture is refused with a hint; --fresh restarts
    assert train(12) == 1
    assert "--fresh" in _error_line(capsys, "train")
    assert train(12, "--fresh") == 0
    assert de.load_model(out).config()["hidden"] == 12


def test_train_with_force_field_scores(work, tmp_path, capsys):
    out = str(tmp_path / "tsm.pt")
    args = ["train", work["npz"], "--mapping", "heavy", "--out", out, "--steps", "5",
            "--hidden", "8", "--layers", "1", "--batch-size", "8", "--no-progress", "--no-png"]
    assert main(args + ["--scores-forcefield", "amber14-all.xml"]) == 0
    assert "precision P" in open(out + ".log").read()
    assert de.load_model(out).metadata["training"]["scores"] == ["amber14-all.xml"]
    beads = tmp_path / "overlap.json"
    beads.write_text(json.dumps([[0, 1, 4], [4, 6, 8]]))
    assert main(args + ["--beads", str(beads), "--fresh",
                        "--scores-forcefield", "amber14-all.xml"]) == 1
    assert "share atoms" in _error_line(capsys, "train")
    assert main(args + ["--fresh", "--scores-system", str(tmp_path / "nope.xml")]) == 1
    assert "no such file" in _error_line(capsys, "train")
    # a fine-tune from the model just written: same weights before any step
    tuned = str(tmp_path / "tuned.pt")
    assert main(args[:5] + [tuned] + args[6:] + ["--init-from", out, "--steps", "1",
                                                 "--train-only", "prior.gain_coeffs",
                                                 "--gain-scales", "0.05"]) == 0
    x = torch.tensor(load_reference(work["npz"]).xyz[:2][:, de.load_model(out).metadata[
        "particle_selection"]])
    a, b = de.load_model(out), de.load_model(tuned)
    assert b.config()["prior"]["gain_scales"] == [0.05]
    torch.testing.assert_close(a.energy(x, 0.5), b.energy(x, 0.5), rtol=0.05, atol=0.5)


def _energy(module_or_system, positions):
    if isinstance(module_or_system, openmm.System):
        system = module_or_system
    else:
        system = openmm.System()
        for _ in range(len(positions)):
            system.addParticle(12.0)
        system.addForce(module_or_system)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions)
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)


def _expected_kj(model, x_nm, temperature=300.0):
    x = torch.tensor(np.asarray(x_nm), dtype=torch.float32)[None]
    e = model.energy(x, model.t_min).item()
    return de.kt_kj_per_mol(temperature) * e


def test_export_torchscript_and_xml(tmp_path):
    from openmm_diffenergy.openmm_force import load_openmmtorch

    ts, xml = str(tmp_path / "cg_ts.pt"), str(tmp_path / "cg.xml")
    assert main(["export", CG_MODEL, "--torchscript", ts, "--xml", xml,
                 "--temperature", "350"]) == 0
    model = de.load_model(CG_MODEL)
    beads = mdtraj.load(str(tmp_path / "cg.pdb"))
    assert beads.n_atoms == 5
    x = beads.xyz[0].astype(float)
    expected = _expected_kj(model, x, 350.0)
    force = load_openmmtorch().TorchForce(ts)     # a plain TorchScript file
    assert _energy(force, x) == pytest.approx(expected, rel=1e-5)
    system = openmm.XmlSerializer.deserialize(open(xml).read())    # plain OpenMM reads it
    assert system.getNumParticles() == 5
    assert _energy(system, x) == pytest.approx(expected, rel=1e-5)


def test_export_weight_is_the_lambda_learned_parameter(tmp_path):
    xml = str(tmp_path / "cg.xml")
    assert main(["export", CG_MODEL, "--xml", xml, "--weight", "0.25"]) == 0
    system = openmm.XmlSerializer.deserialize(open(xml).read())
    force = system.getForce(system.getNumForces() - 1)
    assert isinstance(force, openmm.CustomCVForce)
    assert force.getGlobalParameterName(0) == de.LEARNED_SCALE
    assert force.getGlobalParameterDefaultValue(0) == 0.25
    x = mdtraj.load(str(tmp_path / "cg.pdb")).xyz[0].astype(float)
    expected = _expected_kj(de.load_model(CG_MODEL), x)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x)
    for lam in (0.25, 1.0):
        ctx.setParameter(de.LEARNED_SCALE, lam)
        energy = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)
        assert energy == pytest.approx(lam * expected, rel=1e-5)


def test_simulate_learned_only_with_replicas(tmp_path):
    out = str(tmp_path / "cg.dcd")
    assert main(["simulate", CG_MODEL, "--steps", "40", "--timestep-fs", "2", "--save-ps",
                 "0.02", "--replicas", "2", "--out", out, "--no-progress"]) == 0
    traj = mdtraj.load(out, top=str(tmp_path / "cg.pdb"))
    assert traj.n_frames == 4 and traj.n_atoms == 10
    rows = np.loadtxt(tmp_path / "cg.csv", delimiter=",", skiprows=1)
    assert rows.shape == (4, 3) and np.isfinite(rows).all()
    np.testing.assert_allclose(rows[:, 0], [0.02, 0.04, 0.06, 0.08])
    np.testing.assert_allclose(rows[:, 1], rows[:, 2])        # only the learned force
    # the learned energy of the last frame is the sum of both replicas' kT * E
    model = de.load_model(CG_MODEL)
    last = traj.xyz[-1].astype(float)
    expected = _expected_kj(model, last[:5]) + _expected_kj(model, last[5:])
    # DCD keeps float32 angstrom (xtc's 1e-3 nm rounding moved the stiff prior by 0.3%)
    assert rows[-1, 2] == pytest.approx(expected, rel=1e-3, abs=1e-2)
    assert (tmp_path / "cg.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_beside_amber(tmp_path):
    out = str(tmp_path / "aa.pdb")
    assert main(["simulate", AA_MODEL, "--forcefield", "amber14-all.xml", "--weight", "0.1",
                 "--steps", "20", "--save-ps", "0.01", "--out", out, "--no-progress",
                 "--no-png"]) == 0
    traj = mdtraj.load(out)
    assert traj.n_frames == 2 and traj.n_atoms == 22
    rows = np.loadtxt(tmp_path / "aa.csv", delimiter=",", skiprows=1)
    assert np.all(np.abs(rows[:, 1] - rows[:, 2]) > 1.0)       # amber terms present too
    model = de.load_model(AA_MODEL)
    expected = 0.1 * _expected_kj(model, traj.xyz[-1].astype(float))
    assert rows[-1, 2] == pytest.approx(expected, rel=1e-3, abs=0.05)


def test_simulate_reports_a_blow_up_in_one_line(tmp_path, capsys):
    # 40 fs with amber's unconstrained X-H bonds: positions turn NaN within a few steps
    out = str(tmp_path / "blow.dcd")
    capsys.readouterr()
    assert main(["simulate", AA_MODEL, "--forcefield", "amber14-all.xml", "--timestep-fs",
                 "40", "--steps", "400", "--save-ps", "0.04", "--out", out, "--no-progress",
                 "--no-png"]) == 1
    err = _error_line(capsys, "simulate")
    assert "became unstable" in err and "NaN" in err and "--timestep-fs" in err


def test_sample_writes_folded_samples_with_their_energies(tmp_path, capsys):
    out = str(tmp_path / "s.dcd")
    assert main(["sample", AA_MODEL, "--n", "12", "--steps", "40", "--corrector-steps", "5",
                 "--chirality", "L", "--out", out, "--no-progress"]) == 0
    traj = mdtraj.load(out, top=str(tmp_path / "s.pdb"))
    assert traj.n_frames == 12 and traj.n_atoms == 22
    from openmm_diffenergy.alanine import is_l_chiral
    assert is_l_chiral(traj.topology, traj.xyz).all()
    rows = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    assert rows.shape == (12, 3) and set(rows[:, 2]) <= {0.0, 1.0}
    model = de.load_model(AA_MODEL)
    with torch.no_grad():        # the CSV holds E(x, t_min) of the written structures
        e = model.energy(torch.tensor(traj.xyz, dtype=torch.float32), model.t_min)
    np.testing.assert_allclose(rows[:, 1], e.numpy(), rtol=1e-3, atol=0.05)
    text = capsys.readouterr().out
    assert "5 MALA steps" in text and "mirrored into L" in text
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_nll_json_and_csv(work, tmp_path):
    out = str(tmp_path / "nll.json")
    assert main(["nll", work["model"], work["dcd"], "--top", work["pdb"], "--steps", "4",
                 "--max-frames", "6", "--out", out, "--no-progress"]) == 0
    data = json.loads(open(out).read())
    model = de.load_model(work["model"])
    traj = mdtraj.load(work["dcd"], top=work["pdb"])[:6]
    x = torch.tensor(traj.xyz[:, model.metadata["particle_selection"]], dtype=torch.float64)
    direct = de.nll(model, None, x, steps=4)
    np.testing.assert_allclose(data["nll"], direct.nll.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(data["nll"]) - np.array(data["nll_model"]),
                               model.dof * np.log(model.length_scale), atol=1e-6)
    assert data["method"]["path"] == "flow" and len(data["energy_kT"]) == 6
    assert (tmp_path / "nll.png").exists()
    csv = str(tmp_path / "nll.csv")
    assert main(["nll", work["model"], work["pdb"], "--path", "diffusion", "--divergence",
                 "hutchinson", "--steps", "4", "--out", csv, "--no-progress",
                 "--no-png"]) == 0
    rows = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)
    assert rows.shape == (1, 4) and np.isfinite(rows).all()


def test_nll_fast_divergence_matches_exact(work, tmp_path):
    from openmm_diffenergy.cli import _divergences

    if "fast" not in _divergences():
        pytest.skip("this package has no 'fast' divergence estimator")
    out = {}
    for name in ("exact", "fast"):
        path = str(tmp_path / f"{name}.json")
        assert main(["nll", CG_MODEL, work["pdb"], "--divergence", name, "--steps", "5",
                     "--out", path, "--no-progress", "--no-png"]) == 0
        out[name] = json.loads(open(path).read())
    assert out["fast"]["method"]["estimator"] != out["exact"]["method"]["estimator"]
    np.testing.assert_allclose(out["fast"]["nll"], out["exact"]["nll"], atol=1e-4)


@pytest.mark.parametrize("argv, command, needle", [
    (["simulate", CG_MODEL, "--temperature", "-5"], "simulate", "--temperature"),
    (["simulate", CG_MODEL, "--timestep-fs", "nan"], "simulate", "finite"),
    (["simulate", "missing.pt"], "simulate", "no such file: missing.pt"),
    (["nll", CG_MODEL, "missing.dcd"], "nll", "no such file: missing.dcd"),
    (["simulate", CG_MODEL, "--out", "x.mp4"], "simulate", "unknown output format '.mp4'"),
    (["nll", CG_MODEL, "{pdb}", "--out", "x.txt"], "nll", ".csv or .json"),
    (["nll", CG_MODEL, "{dcd}"], "nll", "--top"),
    (["nll", CG_MODEL, "{npz}"], "nll", "unknown trajectory format '.npz'"),
    (["simulate", "{npz}"], "simulate", "not a openmm_diffenergy model"),
    (["simulate", AA_MODEL, "--structure", "{bb_pdb}"], "simulate", "another molecule"),
    (["nll", "{model}", "{bb_pdb}"], "nll", "another molecule"),
    (["export", CG_MODEL], "export", "nothing to export"),
    (["simulate", AA_MODEL, "--replicas", "2", "--forcefield", "amber14-all.xml"],
     "simulate", "replicas"),
    (["train", "{dcd}", "--top", "{pdb}", "--mapping", "name XYZ", "--out", "{tmp}/x.pt"],
     "train", "selects no atoms"),
    (["simulate", CG_MODEL, "--steps", "0"], "simulate", "positive integer"),
    (["sample", CG_MODEL, "--chirality", "L", "--n", "2", "--steps", "2", "--out",
      "{tmp}/s.pdb"], "sample", "--chirality L needs the alanine"),
    (["sample", CG_MODEL, "--corrector-steps", "-1"], "sample", "--corrector-steps"),
])
def test_bad_arguments_exit_nonzero_with_one_line(work, tmp_path, capsys, argv, command,
                                                  needle):
    # a 6-atom structure that is not the model's molecule
    bb_pdb = str(tmp_path / "bb.pdb")
    mdtraj.load(work["pdb"]).atom_slice(range(6)).save_pdb(bb_pdb)
    names = {"pdb": work["pdb"], "dcd": work["dcd"], "npz": work["npz"],
             "model": work["model"], "bb_pdb": bb_pdb, "tmp": str(tmp_path)}
    argv = [a.format(**names) for a in argv]
    capsys.readouterr()
    rc = main(argv)
    assert rc in (1, 2)
    assert needle in _error_line(capsys, command)


def test_registry_adds_a_subcommand(capsys):
    names = [c.name for c in COMMANDS]
    assert names[:5] == ["generate-data", "train", "export", "simulate", "nll"]
    seen = {}

    def add_arguments(p):
        p.add_argument("--value", type=float, required=True, help="a number, K")

    def run(args):
        seen["value"] = args.value
        if args.value > 1:
            raise ValueError("value too large")
        return 0

    register(Command("probe", "a test command", add_arguments, run))
    try:
        assert main(["probe", "--value", "0.5"]) == 0 and seen["value"] == 0.5
        assert main(["probe", "--value", "3"]) == 1
        assert _error_line(capsys, "probe") == "diffenergy probe: error: value too large"
    finally:
        COMMANDS[:] = [c for c in COMMANDS if c.name != "probe"]
    assert main(["--help"]) == 0


def test_console_script_entry_point(tmp_path):
    assert os.path.exists(CONSOLE), "the diffenergy console script is not installed " \
        "(pip install -e .)"
    ts = str(tmp_path / "cg.pt")
    done = subprocess.run([CONSOLE, "export", CG_MODEL, "--torchscript", ts],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {ts}" in done.stdout and os.path.getsize(ts) > 1000
    done = subprocess.run([CONSOLE, "simulate", CG_MODEL, "--temperature", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("diffenergy simulate: error: argument --temperature: must "
                                   "be positive, got -1 (see 'diffenergy simulate --help')")
    done = subprocess.run([CONSOLE, "nll", CG_MODEL, str(tmp_path / "none.pdb")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == f"diffenergy nll: error: no such file: {tmp_path}/none.pdb"
