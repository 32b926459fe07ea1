"""Alanine-dipeptide reference data and particle selections for the shipped models."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Reference", "load_reference", "reference_system", "reference_scores",
           "generate_reference", "selection", "particle_bonds",
           "CG_BACKBONE", "phi_psi", "phi_psi_js"]

# the 5-bead coarse-grained backbone: C(ACE) N CA C N(NME)
CG_BACKBONE = (("ACE", "C"), ("ALA", "N"), ("ALA", "CA"), ("ALA", "C"), ("NME", "N"))


@dataclass
class Reference:
    """Reference MD of alanine dipeptide.

    Attributes
    ----------
    xyz : numpy.ndarray, shape (F, 22, 3), nm
    topology : mdtraj.Topology
    masses : numpy.ndarray, shape (22,), dalton
    atom_names : list of str, "RES:NAME"
    settings : dict
    """

    xyz: np.ndarray
    topology: object
    masses: np.ndarray
    atom_names: list
    settings: dict


def load_reference(path: str) -> Reference:
    """Load the ``.npz`` written by ``scripts/generate_ala2_data.py``."""
    import mdtraj
    from openmm import app

    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference data not found: {path} (make it with "
                                "scripts/generate_ala2_data.py)")
    data = np.load(path)
    pdb = app.PDBFile(io.StringIO(str(data["topology_pdb"])))
    top = mdtraj.Topology.from_openmm(pdb.topology)
    masses = np.array([a.element.mass for a in top.atoms])
    names = [f"{a.residue.name}:{a.name}" for a in top.atoms]
    return Reference(data["xyz"], top, masses, names, json.loads(str(data["settings"])))


def reference_system(ref: Reference):
    """The amber14 ``openmm.System`` the reference data were made with (no constraints)."""
    from .alanine import alanine_system

    return alanine_system(ref.topology.to_openmm(), ref.settings.get("solvent", "vacuum"),
                          constraints=None)


def reference_scores(ref: Reference, progress: bool = False) -> np.ndarray:
    """Data scores ``grad log p_0 = F / kT`` of every reference frame, 1/nm.

    Parameters
    ----------
    ref : Reference
    progress : bool

    Returns
    -------
    numpy.ndarray, shape (F, 22, 3)
        Amber14 forces (kJ/mol/nm) over ``kT`` at the reference temperature.
    """
    from .openmm_force import kt_kj_per_mol
    from .reweighting import potential_forces

    forces = potential_forces(reference_system(ref), ref.xyz, progress=progress)
    return forces / kt_kj_per_mol(float(ref.settings.get("temperature", 300.0)))


def _atomic_savez(path, **arrays):
    from .io import atomic_write

    with atomic_write(path) as fh:
        np.savez_compressed(fh, **arrays)


def generate_reference(out: str, ns: float = 20.0, save_ps: float = 2.0, chunk_ps: float = 200.0,
                       equilibrate_ps: float = 100.0, solvent: str = "vacuum",
                       temperature: float = 300.0, timestep_fs: float = 1.0, seed: int = 2025,
                       platform: str = "Reference", progress: bool = True,
                       log=print) -> Reference:
    """Reference MD of alanine dipeptide with amber14, written to ``out`` (``.npz``).

    Builds ACE-ALA-NME from internal coordinates, parameterizes it with amber14 (vacuum or
    OBC2), minimizes, equilibrates and runs Langevin dynamics (no constraints, friction
    1/ps), saving a frame every ``save_ps``. After each chunk of ``chunk_ps`` the frames
    and the integrator state are saved atomically beside ``out``; calling again with the
    same ``out`` resumes where a run stopped.

    Parameters
    ----------
    out : str
        Output ``.npz``: ``xyz`` (F, 22, 3) float32 nm, ``time_ps`` (F,), ``topology_pdb``
        (PDB text) and ``settings`` (JSON text).
    ns : float
        Production length, ns.
    save_ps, chunk_ps, equilibrate_ps : float
        Frame interval, checkpoint interval and equilibration length, ps.
    solvent : {"vacuum", "obc2"}
    temperature : float
        Kelvin.
    timestep_fs : float
        Femtoseconds.
    seed : int
        Seeds the velocities and the Langevin noise.
    platform : str
        OpenMM platform; for 22 atoms Reference ran ~20x faster than CPU on 2 cores.
    progress : bool
        Show a progress bar over frames.
    log : callable
        Receives status lines.

    Returns
    -------
    Reference
        The data written to ``out``.

    Raises
    ------
    ValueError
        If a length, interval or the temperature is not positive and finite.
    RuntimeError
        If any frame lost L-chirality (the run is then invalid).
    """
    import time

    import openmm
    from openmm import app, unit
    from tqdm.auto import tqdm

    from .alanine import alanine_system, build_alanine_dipeptide, is_l_chiral
    from .io import atomic_write
    from .openmm_force import openmm_seed

    for name, value in (("ns", ns), ("save_ps", save_ps), ("chunk_ps", chunk_ps),
                        ("temperature", temperature), ("timestep_fs", timestep_fs)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if not (np.isfinite(equilibrate_ps) and equilibrate_ps >= 0):
        raise ValueError(f"equilibrate_ps must be >= 0, got {equilibrate_ps}")
    top, pos = build_alanine_dipeptide()
    system = alanine_system(top, solvent, constraints=None)
    dt = timestep_fs * unit.femtoseconds
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1 / unit.picosecond, dt)
    integ.setRandomNumberSeed(openmm_seed(seed))
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform))
    steps_per_frame = int(round(save_ps * 1000 / timestep_fs))
    frames_total = int(round(ns * 1000 / save_ps))
    frames_per_chunk = max(1, int(round(chunk_ps / save_ps)))
    partial, state_file = out + ".partial.npz", out + ".state.xml"

    if os.path.exists(partial) and os.path.exists(state_file):
        done = dict(np.load(partial))
        xyz = list(done["xyz"])
        with open(state_file) as fh:
            ctx.setState(openmm.XmlSerializer.deserialize(fh.read()))
        log(f"resuming at frame {len(xyz)} of {frames_total}")
    else:
        ctx.setPositions(pos)
        openmm.LocalEnergyMinimizer.minimize(ctx)
        ctx.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))
        integ.step(int(equilibrate_ps * 1000 / timestep_fs))
        xyz = []
    pdb = io.StringIO()
    app.PDBFile.writeFile(top, pos * unit.nanometer, pdb)
    settings = {"ns": ns, "save_ps": save_ps, "chunk_ps": chunk_ps,
                "equilibrate_ps": equilibrate_ps, "solvent": solvent,
                "temperature": temperature, "timestep_fs": timestep_fs, "seed": seed,
                "platform": platform}
    settings.update(force_field="amber14-all" + ("+obc2" if solvent == "obc2" else ""),
                    integrator="LangevinMiddleIntegrator", friction_per_ps=1.0,
                    constraints=None)
    start = time.perf_counter()
    bar = tqdm(total=frames_total, initial=len(xyz), desc="ala2 MD frames", unit="frame",
               disable=not progress)
    while len(xyz) < frames_total:
        for _ in range(min(frames_per_chunk, frames_total - len(xyz))):
            integ.step(steps_per_frame)
            x = ctx.getState(getPositions=True).getPositions(asNumpy=True)
            xyz.append(np.asarray(x.value_in_unit(unit.nanometer), dtype=np.float32))
            bar.update(1)
        _atomic_savez(partial, xyz=np.array(xyz))
        state = openmm.XmlSerializer.serialize(ctx.getState(getPositions=True,
                                                            getVelocities=True))
        with atomic_write(state_file, "w") as fh:
            fh.write(state)
    bar.close()
    xyz = np.array(xyz)
    chiral = is_l_chiral(top, xyz)
    if not chiral.all():
        raise RuntimeError(f"{(~chiral).sum()} frames lost L-chirality; the run is invalid")
    _atomic_savez(out, xyz=xyz, time_ps=np.arange(1, len(xyz) + 1) * save_ps,
                  topology_pdb=np.array(pdb.getvalue()), settings=np.array(json.dumps(settings)))
    os.remove(partial)
    os.remove(state_file)
    log(f"wrote {out}: {len(xyz)} frames, {len(xyz) * save_ps / 1000:g} ns "
        f"({time.perf_counter() - start:.0f} s this run)")
    return load_reference(out)


def _find(top, resname, name):
    for a in top.atoms:
        if a.residue.name == resname and a.name == name:
            return a.index
    raise ValueError(f"no atom {resname}:{name}")


def particle_bonds(topology, indices) -> list:
    """Bonds of ``topology`` between selected atoms, as pairs of positions in ``indices``.

    Parameters
    ----------
    topology : mdtraj.Topology
    indices : sequence of int
        Selected atom indices (the model's particles, in order).
    """
    where = {int(a): k for k, a in enumerate(indices)}
    pairs = {(where[b[0].index], where[b[1].index]) for b in topology.bonds
             if b[0].index in where and b[1].index in where}
    return sorted((min(p), max(p)) for p in pairs)


def selection(topology, kind: str):
    """Atom indices and torsion features of a shipped model.

    Parameters
    ----------
    topology : mdtraj.Topology
    kind : {"aa", "cg"}
        ``"aa"``: all 22 atoms, every proper torsion of the bond graph. ``"cg"``: the 5
        backbone beads (C N CA C N) with phi and psi.

    Returns
    -------
    indices : list of int
    torsions : list of (int, int, int, int), indices into the selection
    """
    from .models.molecule import torsion_quadruples

    if kind == "aa":
        bonds = [(b[0].index, b[1].index) for b in topology.bonds]
        return list(range(topology.n_atoms)), torsion_quadruples(bonds, topology.n_atoms)
    if kind == "cg":
        return [_find(topology, r, n) for r, n in CG_BACKBONE], [(0, 1, 2, 3), (1, 2, 3, 4)]
    raise ValueError(f"kind must be 'aa' or 'cg', got {kind!r}")


def phi_psi(xyz, topology, kind: str = "aa") -> np.ndarray:
    """Backbone dihedrals in radians, shape (F, 2), from all-atom or CG positions.

    Uses mdtraj's definitions (phi: C(ACE)-N-CA-C, psi: N-CA-C-N(NME)).
    """
    import mdtraj

    xyz = np.asarray(xyz).reshape(-1, np.shape(xyz)[-2], 3)
    if kind == "aa":
        traj = mdtraj.Trajectory(xyz, topology)
        return np.stack([mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]], 1)
    quads = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])
    traj = mdtraj.Trajectory(xyz, None)
    return mdtraj.compute_dihedrals(traj, quads, periodic=False)


def phi_psi_js(a, b, bins: int = 64) -> float:
    """Jensen-Shannon divergence (nats) between the phi/psi histograms of two sample sets.

    Parameters
    ----------
    a, b : array-like, shape (n, 2)
        (phi, psi) in radians.
    bins : int
        Bins per angle on (-pi, pi]; the benchmarks use 64 x 64.
    """
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    a, b = np.asarray(a).reshape(-1, 2), np.asarray(b).reshape(-1, 2)
    if not (len(a) and len(b)):
        raise ValueError("both sample sets need at least one (phi, psi) pair")
    p = np.histogram2d(a[:, 0], a[:, 1], bins=[edges, edges])[0].ravel()
    q = np.histogram2d(b[:, 0], b[:, 1], bins=[edges, edges])[0].ravel()
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(x, y):
        nz = x > 0
        return float((x[nz] * np.log(x[nz] / y[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)
