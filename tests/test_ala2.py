"""Alanine dipeptide: builder, reference-data script, selections, training script."""
import os

import mdtraj
import numpy as np
import openmm
import pytest

from openmm_diffenergy.ala2 import load_reference, phi_psi, selection
from openmm_diffenergy.alanine import alanine_system, build_alanine_dipeptide, is_l_chiral

from _helpers import ROOT, load


@pytest.mark.parametrize("phi, psi", [(-70.0, 140.0), (-80.0, -40.0), (60.0, 40.0)])
def test_builder_geometry_and_chirality(phi, psi):
    top, pos = build_alanine_dipeptide(phi, psi)
    assert top.getNumAtoms() == 22
    traj = mdtraj.Trajectory(pos[None], mdtraj.Topology.from_openmm(top))
    # mdtraj's phi is C(ACE)-N-CA-C and psi N-CA-C-N(NME): the builder's definitions
    assert np.degrees(mdtraj.compute_phi(traj)[1][0, 0]) == pytest.approx(phi, abs=1e-3)
    assert np.degrees(mdtraj.compute_psi(traj)[1][0, 0]) == pytest.approx(psi, abs=1e-3)
    assert is_l_chiral(top, pos).all()
    mirror = pos * np.array([-1.0, 1.0, 1.0])
    assert not is_l_chiral(top, mirror).any()
    # amber14 knows every atom and the built geometry is sane
    system = alanine_system(top)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos)
    energy = ctx.getState(getEnergy=True).getPotentialEnergy()._value
    assert energy < 200.0    # kJ/mol; a clash or a bad bond would be far above


def test_reference_data_script_and_training_script(tmp_path):
    out = str(tmp_path / "ala2.npz")
    load("scripts/generate_ala2_data.py").main(
        ["--ns", "0.02", "--save-ps", "0.5", "--chunk-ps", "5", "--equilibrate-ps", "1",
         "--out", out])
    ref = load_reference(out)
    assert ref.xyz.shape == (40, 22, 3) and ref.settings["constraints"] is None
    assert is_l_chiral(ref.topology.to_openmm(), ref.xyz).all()
    pp = phi_psi(ref.xyz, ref.topology)
    assert pp.shape == (40, 2) and np.isfinite(pp).all()
    idx, torsions = selection(ref.topology, "cg")
    np.testing.assert_allclose(phi_psi(ref.xyz[:, idx], None, "cg"), pp, atol=1e-5)
    aa_idx, aa_torsions = selection(ref.topology, "aa")
    assert aa_idx == list(range(22)) and len(aa_torsions) > 30
    model = str(tmp_path / "cg.pt")
    load("scripts/train_ala2.py").main(["--kind", "cg", "--data", out, "--out", model,
                                        "--steps", "20", "--hidden", "16", "--layers", "1"])
    import openmm_diffenergy as de
    m = de.load_model(model, n_particles=5, model_class="MoleculeEnergy")
    assert m.metadata["kind"] == "cg" and len(m.metadata["masses"]) == 5
    assert "train_ala2.py" in open(model + ".log").read()


def test_missing_reference_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate_ala2_data"):
        load_reference(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="kind"):
        selection(None, "martini")


@pytest.mark.parametrize("mapping, n", [("all", 22), ("heavy", 10), ("backbone", None),
                                        ("ca", 1), ("name N or name CA", 3),
                                        ([[4, 5, 6], [8, 10]], 2)])
def test_training_data_mappings(tmp_path, mapping, n):
    import openmm_diffenergy as de
    top, pos = build_alanine_dipeptide()
    mtop = mdtraj.Topology.from_openmm(top)
    rng = np.random.default_rng(0)
    traj = mdtraj.Trajectory(pos[None] + 0.01 * rng.normal(size=(6, 22, 3)), mtop)
    path = str(tmp_path / "t.dcd")
    traj.save_dcd(path)
    traj[0].save_pdb(str(tmp_path / "t.pdb"))
    data = de.load_training_data(path, top=str(tmp_path / "t.pdb"), mapping=mapping)
    if n is None:
        n = mtop.select("backbone").size
    assert data.positions.shape == (6, n, 3)
    np.testing.assert_allclose(data.positions.mean(1).numpy(), 0.0, atol=1e-6)
    if n > 1:
        assert data.length_scale == pytest.approx(
            float(np.sqrt((data.positions.numpy() ** 2).mean())), rel=1e-5)
    if not isinstance(mapping, str):
        m = np.array([a.element.mass for a in mtop.atoms])
        assert data.mapping.masses[0] == pytest.approx(m[[4, 5, 6]].sum())
    with pytest.raises(ValueError, match="cannot load"):
        de.load_training_data(str(tmp_path / "missing.dcd"), top=str(tmp_path / "t.pdb"))


@pytest.mark.parametrize("kind", ["aa", "cg"])
def test_shipped_models_load_and_export(kind):
    import torch
    from openmm import unit

    import openmm_diffenergy as de
    path = os.path.join(ROOT, "models", f"ala2_{kind}.pt")
    model = de.load_model(path, model_class="MoleculeEnergy")
    meta = model.metadata
    assert meta["kind"] == kind and meta["temperature"] == 300.0
    assert len(meta["masses"]) == model.n_particles == len(meta["particle_selection"])
    assert model.n_particles == (22 if kind == "aa" else 5)
    ref = load_reference(os.path.join(ROOT, "data", "ala2_vacuum.npz"))
    x = ref.xyz[:3][:, meta["particle_selection"]]
    system = openmm.System()
    for m in meta["masses"]:
        system.addParticle(m)
    de.add_learned_force(system, path, masses=True)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    kt = de.kt_kj_per_mol(300.0)
    for xi in x:
        ctx.setPositions(xi.astype(float))
        f = ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer)
        ref_f = (kt * de.score(model, torch.tensor(xi)[None], model.t_min))[0].detach().numpy()
        # float32 network: relative error 1e-4 of the largest force
        assert np.abs(f - ref_f).max() <= 1e-4 * np.abs(ref_f).max()
