"""The ``diffenergy`` command line.

Subcommands (``diffenergy <command> --help`` lists each one's options, units and
defaults)::

    diffenergy generate-data   alanine-dipeptide reference MD (amber14) -> .npz (+ DCD/XTC/PDB)
    diffenergy train           trajectories (any mdtraj format) -> model file
    diffenergy export          model -> TorchScript for openmmtorch.TorchForce, System XML
    diffenergy simulate        Langevin MD with the learned force -> DCD/XTC/PDB, CSV, PNG
    diffenergy nll             -log p0 of structures (PDB/DCD/XTC) -> CSV/JSON, PNG

Adding a subcommand: write ``add_arguments(parser)`` and ``run(args) -> int`` and append a
:class:`Command` to :data:`COMMANDS` (or call :func:`register`). :func:`main` turns the
package's errors (``ValueError``, ``OSError``, ``RuntimeError``, ``ImportError``,
OpenMM exceptions) into one line on stderr, ``diffenergy <command>: error: <message>``,
and exit status 1; bad command-line arguments exit with status 2 and one line too.
``diffenergy --traceback <command> ...`` shows the traceback instead.

Units throughout: nm, ps (fs for timesteps), K, kJ/mol; learned energies and ``-log p``
in kT (nats).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["main", "build_parser", "Command", "COMMANDS", "register", "load_structures",
           "particle_mapping", "structure_for_model", "learned_system", "run_langevin",
           "alanine_dihedrals", "add_generate_data_arguments", "generate_data_kwargs",
           "add_model_arguments", "add_train_config_arguments", "train_config",
           "positive_float", "nonnegative_float", "positive_int", "finite_float"]


# ----------------------------------------------------------------------------- argument types

def finite_float(text: str) -> float:
    """argparse type: a finite number (rejects NaN and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def _nonnegative_int(text: str) -> int:
    return _integer(text, 0)


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message``."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes
    ----------
    name : str
        As typed after ``diffenergy``.
    help : str
        One line for ``diffenergy --help``.
    add_arguments : callable
        ``add_arguments(parser)`` adds the subcommand's options.
    run : callable
        ``run(args) -> int | None`` does the work; raise ``ValueError`` (or another
        error :func:`main` reports) for bad input.
    description : str
        Longer text for ``diffenergy <name> --help`` (default: ``help``).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str = ""


COMMANDS: list[Command] = []


def register(command: Command) -> Command:
    """Add a subcommand (replacing one of the same name)."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != command.name]
    COMMANDS.append(command)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The ``diffenergy`` parser with one subparser per entry of :data:`COMMANDS`."""
    from . import __version__

    parser = _Parser(prog="diffenergy",
                     description="Energy-parameterized diffusion models of molecules in OpenMM: "
                                 "make data, train, export, simulate, likelihoods.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run 'diffenergy <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help,
                           description=command.description or command.help,
                           formatter_class=_FORMATTER)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _user_errors() -> tuple:
    errors = [ValueError, OSError, RuntimeError, ImportError, EOFError]
    if "openmm" in sys.modules:
        errors.append(sys.modules["openmm"].OpenMMException)
    return tuple(errors)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv=None) -> int:
    """Run ``diffenergy``; returns the exit status (0 on success).

    Parameters
    ----------
    argv : list of str, optional
        Arguments after the program name; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad argument (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.argv = argv
    prog = f"diffenergy {args.command}"
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.traceback or not isinstance(err, _user_errors()):
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- shared helpers

def _stem(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root if ext else path


def _png_path(args, out: str) -> str | None:
    if getattr(args, "no_png", False):
        return None
    return args.png or _stem(out) + ".png"


def _add_png_arguments(p, what: str) -> None:
    p.add_argument("--png", default=None,
                   help=f"PNG of {what} (default: the output path with .png)")
    p.add_argument("--no-png", action="store_true", help="write no PNG")


def _write_text(path: str, text: str) -> None:
    from .io import atomic_write

    with atomic_write(path, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def _figure(path: str, panels: int = 1, size=(6.0, 4.3)):
    """Axes (1 x ``panels``) of a new figure; on exit it is written to ``path`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(size[0] * panels, size[1]), squeeze=False)
    try:
        yield axes[0]
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    print(f"wrote {path}")


def _trajectory_formats() -> list:
    import mdtraj

    return sorted(mdtraj.formats.registry.FormatRegistry.loaders)


def _check_format(path: str, kind: str = "trajectory") -> None:
    formats = _trajectory_formats()
    name = path.lower()
    if not any(name.endswith(ext) for ext in formats):
        raise ValueError(f"{path}: unknown {kind} format {os.path.splitext(path)[1]!r}; "
                         f"mdtraj reads {', '.join(formats)}")


_NO_TOPOLOGY = (".dcd", ".xtc", ".trr", ".nc", ".ncdf", ".netcdf", ".mdcrd", ".crd", ".dtr",
                ".lammpstrj", ".xyz", ".xyz.gz")


def load_structures(paths, top: str | None = None, stride: int = 1):
    """Frames from files mdtraj reads (PDB, DCD, XTC, HDF5, ...).

    Parameters
    ----------
    paths : str or list of str
    top : str, optional
        Topology file for formats without one (DCD, XTC, ...).
    stride : int
        Keep every ``stride``-th frame.

    Returns
    -------
    mdtraj.Trajectory

    Raises
    ------
    FileNotFoundError
        For a missing file.
    ValueError
        For an unknown format or a file mdtraj cannot read.
    """
    import mdtraj

    paths = [paths] if isinstance(paths, str) else list(paths)
    for path in paths + ([top] if top else []):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        _check_format(path)
        if top is None and path.lower().endswith(_NO_TOPOLOGY):
            raise ValueError(f"{path} holds coordinates only; give its topology with --top "
                             "(a PDB of the same atoms)")
    try:
        traj = mdtraj.load(paths, top=top, stride=stride) if top else \
            mdtraj.load(paths, stride=stride)
    except Exception as err:  # mdtraj raises many kinds for unreadable input
        raise ValueError(f"cannot read {', '.join(paths)}: {_one_line(err)}") from None
    if traj.n_frames == 0 or traj.n_atoms == 0:
        raise ValueError(f"{', '.join(paths)} holds no frames or no atoms")
    if not all(math.isfinite(v) for v in (float(traj.xyz.min()), float(traj.xyz.max()))):
        raise ValueError(f"{', '.join(paths)} holds NaN or inf positions")
    return traj


def _traj_from_openmm(topology, positions_nm):
    import mdtraj
    import numpy as np

    return mdtraj.Trajectory(np.asarray(positions_nm, dtype=np.float32).reshape(1, -1, 3),
                             mdtraj.Topology.from_openmm(topology))


def structure_for_model(model, structure: str | None = None, top: str | None = None):
    """Structures to start from or evaluate: a file, or what the model file records.

    Without ``structure``: the model's own structure (``topology_pdb`` metadata, written
    by ``diffenergy train``), or, for the shipped alanine-dipeptide models (metadata
    ``kind`` "aa" or "cg"), ACE-ALA-NME built from internal coordinates.

    Returns
    -------
    mdtraj.Trajectory
    """
    if structure is not None:
        return load_structures(structure, top)
    meta = getattr(model, "metadata", {})
    if meta.get("topology_pdb"):
        from openmm import app

        pdb = app.PDBFile(io.StringIO(meta["topology_pdb"]))
        return _traj_from_openmm(pdb.topology, pdb.getPositions(asNumpy=True)._value)
    if meta.get("kind") in ("aa", "cg"):
        from .alanine import build_alanine_dipeptide

        topology, positions = build_alanine_dipeptide()
        return _traj_from_openmm(topology, positions)
    raise ValueError("the model file records no structure; give one with --structure")


def particle_mapping(model, topology):
    """The atoms-to-particles map of a model on a structure's topology.

    Uses the model's ``bead_groups`` or ``particle_selection`` metadata when the
    structure has more atoms than the model has particles; checks the particle count and,
    where the model records them, the masses (dalton, 0.1%).

    Parameters
    ----------
    model : EnergyModel
    topology : mdtraj.Topology

    Returns
    -------
    CoarseGraining

    Raises
    ------
    ValueError
        If the structure does not fit the model (another molecule).
    """
    import numpy as np

    from .systems import CoarseGraining

    n_model, n_atoms = model.n_particles, topology.n_atoms
    meta = getattr(model, "metadata", {})
    groups = meta.get("bead_groups")
    if groups is None and meta.get("particle_selection") is not None:
        groups = [[int(i)] for i in meta["particle_selection"]]
    if n_atoms == n_model:          # the structure holds exactly the model's particles
        groups = [[k] for k in range(n_atoms)]
    if groups is None or len(groups) != n_model:
        raise ValueError(f"the structure has {n_atoms} atoms but the model acts on "
                         f"{n_model} particles and records no selection of them: a model "
                         "for another molecule?")
    top_index = max(max(g) for g in groups)
    if top_index >= n_atoms:
        raise ValueError(f"the model's particles use atom {top_index}, but the structure "
                         f"has only {n_atoms} atoms: a model for another molecule?")
    cg = CoarseGraining(topology, groups)
    want = meta.get("masses")
    if want is not None and not np.allclose(cg.masses, want, rtol=1e-3):
        k = int(np.argmax(np.abs(cg.masses - np.asarray(want)) > 1e-3 * np.abs(want)))
        raise ValueError(f"particle {k} has mass {cg.masses[k]:.3f} Da in the structure but "
                         f"{float(want[k]):.3f} Da in the model: a model for another molecule?")
    return cg


def _model_temperature(model, value):
    if value is not None:
        return float(value)
    return float(getattr(model, "metadata", {}).get("temperature", 300.0))


def learned_system(model, traj, temperature: float = 300.0, forcefield=None, weight: float = 1.0,
                   n_replicas: int = 1, frame: int = 0, constraints: str = "none",
                   backend: str = "torchforce", t_min: float | None = None):
    """A System with the learned force, its Topology and starting positions.

    Without ``forcefield``: one particle per model particle (bead masses), the learned
    force alone, ``n_replicas`` non-interacting copies (replica ``r`` starts from frame
    ``frame + r`` where the structure has that many frames, and lies 3 nm further along x).
    With ``forcefield`` (OpenMM force-field files, e.g. ``amber14-all.xml``): the classical
    System of all atoms plus the learned force on the model's atoms (one replica).

    Parameters
    ----------
    model : EnergyModel
    traj : mdtraj.Trajectory
        Structure(s) (nm).
    temperature : float
        Kelvin; the learned energy is ``weight * kT * E`` with ``kT = R * temperature``.
        A weight other than 1 is the global parameter ``lambda_learned`` of a
        ``CustomCVForce`` around the learned force (``context.setParameter`` changes it).
    forcefield : list of str, optional
    weight : float
        Multiplies the learned energy (> 0).
    n_replicas, frame : int
    constraints : {"none", "hbonds"}
        Classical System only.
    backend : {"torchforce", "pythonforce"}
    t_min : float, optional
        Diffusion time of the learned energy; default the model's.

    Returns
    -------
    system : openmm.System
    topology : openmm.app.Topology
    positions : numpy.ndarray, shape (n_particles_total, 3), nm
    """
    import numpy as np
    import openmm
    from openmm import app, unit

    from .openmm_force import LEARNED_SCALE, add_learned_force
    from .systems import replicate_system

    if not 0 <= frame < traj.n_frames:
        raise ValueError(f"--frame {frame} is out of range: the structure has "
                         f"{traj.n_frames} frame(s)")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"the learned-energy weight must be positive, got {weight}")
    cg = particle_mapping(model, traj.topology)
    scale = {} if weight == 1.0 else {"scale_parameter": LEARNED_SCALE, "scale": weight}
    if forcefield:
        if n_replicas != 1:
            raise ValueError("replicas need a learned-only System (no --forcefield): copies "
                             "of a classical System would interact")
        if any(len(g) != 1 for g in cg.groups):
            raise ValueError("a model of bead groups (centres of mass) cannot act on the atoms "
                             "of a classical System; run it without --forcefield")
        cons = {"none": None, "hbonds": app.HBonds}[constraints]
        topology = traj.topology.to_openmm()
        box = traj.unitcell_vectors
        if box is not None:
            topology.setPeriodicBoxVectors(box[frame] * unit.nanometer)
        try:
            ff = app.ForceField(*forcefield)
            system = ff.createSystem(topology, nonbondedMethod=app.PME if box is not None
                                     else app.NoCutoff, constraints=cons)
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"cannot build a System with {' '.join(forcefield)}: "
                             f"{_one_line(err)}") from None
        particles = [int(g[0]) for g in cg.groups]
        positions = traj.xyz[frame].astype(float)
    else:
        base = openmm.System()
        masses = getattr(model, "metadata", {}).get("masses", cg.masses)
        for m in masses:
            base.addParticle(float(m) * unit.dalton)
        topology = cg.topology
        starts = [frame + r if frame + r < traj.n_frames else frame for r in range(n_replicas)]
        positions = np.concatenate([cg.map_positions(traj.xyz[f]) + [3.0 * r, 0.0, 0.0]
                                    for r, f in enumerate(starts)])
        system = base
        if n_replicas > 1:
            system, topology = replicate_system(base, n_replicas, topology)
        particles = None
    add_learned_force(system, model, temperature=temperature * unit.kelvin, t_min=t_min,
                      particles=particles, backend=backend, n_replicas=n_replicas, **scale)
    return system, topology, positions


def _platform(name: str, system):
    import openmm

    if name == "auto":
        name = "Reference" if system.getNumParticles() <= 200 else "CPU"
    try:
        return openmm.Platform.getPlatformByName(name)
    except Exception:
        names = [openmm.Platform.getPlatform(i).getName()
                 for i in range(openmm.Platform.getNumPlatforms())]
        raise ValueError(f"no OpenMM platform {name!r}; available: {', '.join(names)}") from None


def run_langevin(system, positions, temperature: float, timestep_fs: float, n_steps: int,
                 save_every: int, friction: float = 1.0, platform: str = "auto", seed: int = 0,
                 minimize: bool = False, progress: bool = True, learned_group: int = 1):
    """Langevin MD (``LangevinMiddleIntegrator``) saving frames and energies.

    Parameters
    ----------
    system : openmm.System
    positions : array-like, shape (n, 3), nm
    temperature : float
        Kelvin.
    timestep_fs : float
        Femtoseconds.
    n_steps, save_every : int
        Steps in total, and between saved frames.
    friction : float
        1/ps.
    platform : str
        OpenMM platform name, or "auto" (Reference up to 200 particles, else CPU).
    seed : int
    minimize : bool
        Minimize the energy first.
    progress : bool
    learned_group : int
        Force group of the learned force.

    Returns
    -------
    dict
        ``xyz`` (F, n, 3) nm, ``time_ps`` (F,), ``potential_kj_mol`` (F,),
        ``learned_kj_mol`` (F,), ``steps`` done, ``seconds``, ``platform`` and ``error``
        (None, or why the run stopped early: its frames up to then are kept).
    """
    import numpy as np
    import openmm
    from openmm import unit
    from tqdm.auto import tqdm

    from .openmm_force import openmm_seed

    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                            timestep_fs * unit.femtoseconds)
    integ.setRandomNumberSeed(openmm_seed(seed))
    plat = _platform(platform, system)
    ctx = openmm.Context(system, integ, plat)
    ctx.setPositions(np.asarray(positions, dtype=float) * unit.nanometer)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(ctx)
    ctx.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))
    out = {"xyz": [], "time_ps": [], "potential_kj_mol": [], "learned_kj_mol": []}
    done, error = 0, None
    start = time.perf_counter()
    bar = tqdm(total=n_steps, desc="MD steps", unit="step", disable=not progress)
    while done < n_steps:
        chunk = min(save_every, n_steps - done)
        try:
            integ.step(chunk)
            state = ctx.getState(getPositions=True, getEnergy=True)
            learned = ctx.getState(getEnergy=True, groups={learned_group})
        except Exception as err:  # the learned force rejects NaN positions
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            why = lines[-1].replace("builtins.", "") if lines else type(err).__name__
            error = f"the simulation became unstable within steps {done}-{done + chunk} ({why})"
            break
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        if not np.isfinite(x).all():
            error = f"positions became NaN after {done + chunk} steps"
            break
        done += chunk
        bar.update(chunk)
        out["xyz"].append(np.asarray(x, dtype=np.float32))
        out["time_ps"].append(done * timestep_fs / 1000.0)
        out["potential_kj_mol"].append(
            state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        out["learned_kj_mol"].append(
            learned.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    bar.close()
    n = system.getNumParticles()
    out = {k: np.asarray(v) for k, v in out.items()}
    out["xyz"] = out["xyz"].reshape(-1, n, 3)
    out.update(steps=done, seconds=time.perf_counter() - start, platform=plat.getName(),
               error=error)
    return out


def alanine_dihedrals(topology, xyz):
    """phi/psi (radians) of every alanine-dipeptide copy in a topology, or None.

    Works for all-atom and backbone-bead topologies: each chain that holds ACE C, ALA N,
    CA, C and NME N contributes phi (C-N-CA-C) and psi (N-CA-C-N).

    Parameters
    ----------
    topology : openmm.app.Topology or mdtraj.Topology
    xyz : numpy.ndarray, shape (F, n_atoms, 3), nm

    Returns
    -------
    numpy.ndarray, shape (F * copies, 2), or None if there is no alanine dipeptide
    """
    import mdtraj
    import numpy as np

    from .ala2 import CG_BACKBONE

    top = topology if isinstance(topology, mdtraj.Topology) else \
        mdtraj.Topology.from_openmm(topology)
    quads = []
    for chain in top.chains:
        index = {(a.residue.name, a.name): a.index for a in chain.atoms}
        if all(key in index for key in CG_BACKBONE):
            b = [index[key] for key in CG_BACKBONE]
            quads.append([[b[0], b[1], b[2], b[3]], [b[1], b[2], b[3], b[4]]])
    if not quads or len(xyz) == 0:
        return None
    quads = np.asarray(quads)                      # (copies, 2, 4)
    traj = mdtraj.Trajectory(np.asarray(xyz, dtype=np.float32), top)
    ang = mdtraj.compute_dihedrals(traj, quads.reshape(-1, 4), periodic=False)
    return ang.reshape(len(xyz), len(quads), 2).reshape(-1, 2)


def _ramachandran(ax, phi_psi, title: str) -> None:
    import numpy as np

    deg = np.degrees(phi_psi)
    ax.hist2d(deg[:, 0], deg[:, 1], bins=60, range=[[-180, 180], [-180, 180]], cmin=1,
              cmap="viridis")
    ax.set_xlabel("phi (degrees)")
    ax.set_ylabel("psi (degrees)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_title(title)


def _save_trajectory(path: str, topology, xyz) -> list:
    """Write frames through mdtraj; for formats without a topology also ``<stem>.pdb``."""
    import mdtraj

    _check_format(path, "output")
    top = topology if isinstance(topology, mdtraj.Topology) else \
        mdtraj.Topology.from_openmm(topology)
    traj = mdtraj.Trajectory(xyz, top)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    traj.save(path)
    written = [path]
    if not path.lower().endswith((".pdb", ".h5", ".hdf5")):
        traj[0].save_pdb(_stem(path) + ".pdb")
        written.append(_stem(path) + ".pdb")
    return written


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(int(n))


def _add_output_arguments(p, out_default: str, out_help: str, png_what: str) -> None:
    """``--out``, ``--threads``, ``--no-progress``, ``--png`` and ``--no-png``."""
    p.add_argument("--out", default=out_default, required=out_default is None, help=out_help)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (1 avoids fighting OpenMM's threads on small machines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_png_arguments(p, png_what)


def _load_model(path: str):
    from .io import load_model

    try:
        model = load_model(path)
    except ValueError as err:  # keep the first clause: torch's unpickling text is long
        raise ValueError(str(err).split(" (")[0]) from None
    if model.n_particles is None:
        raise ValueError(f"{path} is not a particle model; these commands need one that acts "
                         "on atoms or beads")
    return model


# ----------------------------------------------------------------------------- generate-data

def add_generate_data_arguments(p, default_out: str = "ala2_vacuum.npz") -> None:
    """Options of the alanine-dipeptide reference run (also used by the script)."""
    p.add_argument("--ns", type=positive_float, default=20.0, help="production length, ns")
    p.add_argument("--save-ps", type=positive_float, default=2.0, help="frame interval, ps")
    p.add_argument("--chunk-ps", type=positive_float, default=200.0,
                   help="checkpoint interval, ps (a rerun resumes from the last chunk)")
    p.add_argument("--equilibrate-ps", type=nonnegative_float, default=100.0,
                   help="equilibration before production, ps")
    p.add_argument("--solvent", choices=["vacuum", "obc2"], default="vacuum",
                   help="amber14 in vacuum or with OBC2 implicit solvent")
    p.add_argument("--temperature", type=positive_float, default=300.0, help="K")
    p.add_argument("--timestep-fs", type=positive_float, default=1.0,
                   help="fs (no constraints)")
    p.add_argument("--seed", type=int, default=2025, help="velocities and Langevin noise")
    p.add_argument("--platform", default="Reference",
                   help="OpenMM platform; for 22 atoms Reference ran ~20x faster than CPU "
                        "on 2 cores")
    p.add_argument("--out", default=default_out,
                   help="output .npz (xyz nm, time_ps, topology PDB text, settings JSON)")


def generate_data_kwargs(args) -> dict:
    """Keyword arguments of :func:`openmm_diffenergy.ala2.generate_reference`."""
    return {"out": args.out, "ns": args.ns, "save_ps": args.save_ps, "chunk_ps": args.chunk_ps,
            "equilibrate_ps": args.equilibrate_ps, "solvent": args.solvent,
            "temperature": args.temperature, "timestep_fs": args.timestep_fs,
            "seed": args.seed, "platform": args.platform}


def _generate_data_arguments(p) -> None:
    add_generate_data_arguments(p)
    p.add_argument("--trajectory", default=None,
                   help="also write the frames as a trajectory (.dcd, .xtc, .pdb, .h5); "
                        "DCD/XTC get a <stem>.pdb topology beside them")
    _add_png_arguments(p, "the run's phi/psi histogram")


def _generate_data_run(args) -> int:
    from .ala2 import generate_reference

    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out}: the reference data file must end in .npz")
    if args.trajectory:
        _check_format(args.trajectory, "output")
    ref = generate_reference(**generate_data_kwargs(args), log=print)
    if args.trajectory:
        for path in _save_trajectory(args.trajectory, ref.topology, ref.xyz):
            print(f"wrote {path}")
    png = _png_path(args, args.out)
    if png:
        pp = alanine_dihedrals(ref.topology, ref.xyz)
        with _figure(png, size=(5.0, 4.5)) as (ax,):
            _ramachandran(ax, pp, f"amber14 {args.solvent}, {args.temperature:g} K, "
                                  f"{len(ref.xyz)} frames")
    return 0


# ----------------------------------------------------------------------------- train

def add_model_arguments(p) -> None:
    """MoleculeEnergy architecture options (shared with scripts/train_ala2.py)."""
    p.add_argument("--hidden", type=positive_int, default=128, help="width of the MLP layers")
    p.add_argument("--layers", type=positive_int, default=3, help="hidden layers")
    p.add_argument("--t-min", type=nonnegative_float, default=1e-3,
                   help="diffusion time at which the exported force reads the energy")
    p.add_argument("--net-t-floor", type=nonnegative_float, default=0.0,
                   help="the network sees max(t, floor); below it only the Gaussian term and "
                        "the prior depend on t (0: off)")
    p.add_argument("--sigma-out", type=positive_float, default=0.01,
                   help="floor of the network's output scale 1/sqrt(sigma^2 + sigma_out^2), "
                        "model units")
    p.add_argument("--log-sigma-feature", action="store_true",
                   help="give the network log(sigma(t)) as well, which resolves small t")
    p.add_argument("--gain-scales", type=positive_float, nargs="*", default=[],
                   help="noise scales (model units) at which the prior's gains may change with "
                        "t, e.g. 0.01 0.03 0.1 (default: constant gains)")
    p.add_argument("--prior", choices=["fit", "none"], default="fit",
                   help="fit: add a harmonic prior on bond and 1-3 distances and signed volumes, "
                        "measured on the diffused training data (holds bonds and chirality); "
                        "none: the network and a Gaussian baseline only")


def model_options(args) -> dict:
    """MoleculeEnergy keyword arguments from :func:`add_model_arguments` options."""
    return dict(hidden=args.hidden, layers=args.layers, t_min=args.t_min,
                net_t_floor=args.net_t_floor, sigma_out=args.sigma_out,
                log_sigma_feature=args.log_sigma_feature)


def add_train_config_arguments(p) -> None:
    """TrainConfig options (shared with scripts/train_ala2.py)."""
    p.add_argument("--steps", type=positive_int, default=20000, help="optimizer steps in total")
    p.add_argument("--batch-size", type=positive_int, default=256, help="configurations a step")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="Adam learning rate (cosine-decayed to 10%%)")
    p.add_argument("--fp-weight", type=nonnegative_float, default=0.0,
                   help="weight of the Fokker-Planck penalty (0: off)")
    p.add_argument("--fp-t-max", type=positive_float, default=1.0,
                   help="largest time of the FP penalty")
    p.add_argument("--fp-scale", choices=["none", "sigma2"], default="none",
                   help="sigma2: multiply the FP residual by sigma(t)^2 before squaring")
    p.add_argument("--tsm-precision", type=positive_float, default=None,
                   help="P of the target-score/DSM mixture when data scores are given "
                        "(default: estimated from the scores)")
    p.add_argument("--t-eps", type=positive_float, default=1e-3, help="smallest training time")
    p.add_argument("--train-only", nargs="+", default=None, metavar="PREFIX",
                   help="train only parameters whose names start with these prefixes, e.g. "
                        "prior.gain_coeffs (default: all)")
    p.add_argument("--t-power", type=positive_float, default=1.0,
                   help="training times t_eps + (1 - t_eps) u^p: p > 1 favours small t")
    p.add_argument("--seed", type=int, default=0, help="weights, batches and noise")


def train_config(args, **extra):
    """A :class:`~openmm_diffenergy.training.TrainConfig` from parsed options."""
    from .training import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       fp_weight=args.fp_weight, fp_t_max=args.fp_t_max,
                       fp_scale=args.fp_scale, tsm_precision=args.tsm_precision,
                       t_eps=args.t_eps, t_power=args.t_power, train_only=args.train_only,
                       seed=args.seed, **extra)


def _train_arguments(p) -> None:
    p.add_argument("trajectories", nargs="+",
                   help="training frames: any format mdtraj reads (DCD, XTC, PDB, HDF5, ...), "
                        "or an .npz written by 'diffenergy generate-data'")
    p.add_argument("--top", default=None, help="topology (PDB) for DCD/XTC input")
    p.add_argument("--mapping", default="all",
                   help="particles the model sees: all, heavy, backbone, ca, or an mdtraj "
                        "selection such as 'name CA or name CB'")
    p.add_argument("--beads", default=None,
                   help="JSON file of bead groups (lists of atom indices), each bead at its "
                        "group's centre of mass; overrides --mapping")
    p.add_argument("--stride", type=positive_int, default=1, help="keep every n-th frame")
    p.add_argument("--scores-system", default=None,
                   help="OpenMM System XML of the trajectory's atoms: its forces / kT at the "
                        "frames (summed over each bead's group) train the model as target "
                        "scores too (TSM/DSM mixture; see --tsm-precision)")
    p.add_argument("--scores-forcefield", nargs="+", default=None,
                   help="like --scores-system, with the System built from OpenMM force-field "
                        "files (NoCutoff, no constraints), e.g. amber14-all.xml")
    add_model_arguments(p)
    p.add_argument("--torsions", choices=["auto", "none"], default="auto",
                   help="auto: cos/sin of every proper torsion of the particles' bond graph "
                        "(needed to tell mirror images apart)")
    add_train_config_arguments(p)
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights")
    p.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="steps between checkpoints (<out>.ckpt; a rerun resumes from it)")
    p.add_argument("--fresh", action="store_true",
                   help="discard an existing checkpoint instead of resuming from it")
    p.add_argument("--init-from", default=None,
                   help="fine-tune: start from this model file's weights (parameters it lacks "
                        "keep their initial values) with a fresh optimizer")
    p.add_argument("--temperature", type=positive_float, default=300.0,
                   help="K of the training data (stored; the default kT of exported forces)")
    _add_output_arguments(p, None, "model file to write (.pt); also <out>.ckpt (checkpoint) "
                                   "and <out>.log", "the loss curve")


def _particle_bonds(cg, topology) -> list:
    bead_of = {}
    for k, g in enumerate(cg.groups):
        for a in g:
            bead_of[int(a)] = k
    bonds = set()
    for a, b in topology.bonds:
        i, j = bead_of.get(a.index), bead_of.get(b.index)
        if i is not None and j is not None and i != j:
            bonds.add((min(i, j), max(i, j)))
    return sorted(bonds)


def _training_frames(args):
    import mdtraj

    from .data import load_training_data

    files = args.trajectories
    if any(f.endswith(".npz") for f in files):
        from .ala2 import load_reference

        if len(files) != 1:
            raise ValueError("give one .npz reference file, or trajectories readable by mdtraj")
        ref = load_reference(files[0])
        traj = mdtraj.Trajectory(ref.xyz, ref.topology)
    else:
        traj = load_structures(files, args.top)
    mapping = args.mapping
    if args.beads:
        with open(args.beads) as fh:
            try:
                mapping = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"--beads {args.beads} is not JSON: {err}") from None
    return traj, load_training_data(traj, mapping=mapping, stride=args.stride)


def _training_scores(args, traj, cg):
    """Mapped forces / kT of the training frames, from ``--scores-system``."""
    import torch

    from .openmm_force import kt_kj_per_mol
    from .reweighting import potential_forces
    from .serialization import deserialize_system

    if args.scores_system and args.scores_forcefield:
        raise ValueError("give --scores-system or --scores-forcefield, not both")
    if args.scores_system:
        if not os.path.isfile(args.scores_system):
            raise FileNotFoundError(f"no such file: {args.scores_system}")
        with open(args.scores_system) as fh:
            system = deserialize_system(fh.read())
    else:
        from openmm import app

        system = app.ForceField(*args.scores_forcefield).createSystem(
            traj.topology.to_openmm(), nonbondedMethod=app.NoCutoff, constraints=None)
    if system.getNumParticles() != traj.n_atoms:
        raise ValueError(f"the scores System has {system.getNumParticles()} particles; the "
                         f"trajectory has {traj.n_atoms} atoms")
    forces = potential_forces(system, traj.xyz[::args.stride], progress=not args.no_progress)
    return torch.tensor(cg.map_forces(forces) / kt_kj_per_mol(args.temperature),
                        dtype=torch.float32)


def _train_run(args) -> int:
    import numpy as np
    from openmm import app, unit

    from .models import MoleculeEnergy, torsion_quadruples
    from .models.prior import fit_prior
    from .sde import VPSDE
    from .training import train_and_save

    _set_threads(args.threads)
    traj, data = _training_frames(args)
    cg = data.mapping
    n = cg.n_beads
    if n < 2:
        raise ValueError(f"the mapping {args.mapping!r} selects {n} particle; a model needs "
                         "at least 2")
    bonds = _particle_bonds(cg, traj.topology)
    torsions = torsion_quadruples(bonds, n) if args.torsions == "auto" else []
    ckpt = args.out + ".ckpt"
    if args.fresh and os.path.exists(ckpt):
        os.remove(ckpt)
    prior = None
    if args.prior == "fit" and bonds:
        prior = fit_prior(data.positions, bonds, data.length_scale, VPSDE(), seed=args.seed,
                          gain_scales=args.gain_scales)
    model = MoleculeEnergy(n, torsions, length_scale=data.length_scale, seed=args.seed,
                           prior=prior, **model_options(args))
    config = train_config(args, ema_decay=args.ema_decay,
                          checkpoint_every=args.checkpoint_every)
    if args.init_from and not os.path.exists(ckpt):
        from .training import init_from

        init_from(model, args.init_from)
    scores = None
    if args.scores_system or args.scores_forcefield:
        scores = _training_scores(args, traj, cg)
    pdb = io.StringIO()
    app.PDBFile.writeFile(cg.topology, data.positions[0].double().numpy() * unit.nanometer, pdb)
    atoms = list(traj.topology.atoms)
    command = "diffenergy train " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    header = [f"command: {command}",
              f"data: {', '.join(args.trajectories)}, {len(data.positions)} frames; particles "
              f"{n}; length scale {data.length_scale:.4f} nm; torsions {len(torsions)}"]
    meta = {"masses": [float(m) for m in cg.masses], "temperature": args.temperature,
            "kind": "custom", "mapping": args.beads or args.mapping,
            "bead_groups": [[int(a) for a in g] for g in cg.groups],
            "atom_names": [f"{atoms[int(g[0])].residue.name}:{atoms[int(g[0])].name}"
                           for g in cg.groups],
            "topology_pdb": pdb.getvalue()}
    if all(len(g) == 1 for g in cg.groups):
        meta["particle_selection"] = [int(g[0]) for g in cg.groups]
    try:
        result = train_and_save(
            model, data.positions, args.out, config=config, header=header,
            progress=not args.no_progress,
            training_info={"data": [os.path.basename(f) for f in args.trajectories],
                           "frames": len(data.positions), "command": command,
                           "scores": (os.path.basename(args.scores_system)
                                      if args.scores_system else args.scores_forcefield)},
            scores=scores, **meta)
    except (RuntimeError, KeyError) as err:
        if os.path.exists(ckpt):
            raise ValueError(f"cannot resume from {ckpt}: it belongs to another model or "
                             f"settings ({str(err).splitlines()[0]}); pass --fresh to start "
                             "over") from None
        raise
    hist = result["history"]
    last = hist[-1] if hist else {}
    print(f"wrote {args.out}: {n} particles, {len(torsions)} torsions, "
          f"{len(data.positions)} frames, step {last.get('step', args.steps)}, "
          f"loss {last.get('loss', float('nan')):.4f}")
    png = _png_path(args, args.out)
    if png and hist:
        with _figure(png) as (ax,):
            ax.plot([h["step"] for h in hist], [h["loss"] for h in hist])
            ax.set_xlabel("step")
            ax.set_ylabel("denoising score-matching loss (running mean)")
            ax.set_yscale("log" if np.min([h["loss"] for h in hist]) > 0 else "linear")
            ax.set_title(os.path.basename(args.out))
    return 0


# ----------------------------------------------------------------------------- export

def _add_system_arguments(p) -> None:
    p.add_argument("--structure", default=None,
                   help="structure (PDB or any mdtraj format) the model acts on; default the "
                        "model's own (models from 'diffenergy train', or alanine dipeptide "
                        "for the shipped models)")
    p.add_argument("--top", default=None, help="topology for a DCD/XTC --structure")
    p.add_argument("--frame", type=_nonnegative_int, default=0,
                   help="frame of --structure to start from")
    p.add_argument("--forcefield", nargs="+", default=None,
                   help="OpenMM force-field files (e.g. amber14-all.xml implicit/obc2.xml): "
                        "the learned force is added beside them; default: learned force only")
    p.add_argument("--weight", type=positive_float, default=1.0,
                   help="multiplies the learned energy (e.g. 0.1 beside a force field)")
    p.add_argument("--constraints", choices=["none", "hbonds"], default="none",
                   help="constraints of the classical System (with --forcefield)")
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="K (default: the model's training temperature, else 300)")
    p.add_argument("--t-min", type=nonnegative_float, default=None,
                   help="diffusion time at which the energy is read (default: the model's)")
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="non-interacting copies evaluated in one batched call (learned force "
                        "only)")
    p.add_argument("--backend", choices=["torchforce", "pythonforce"], default="torchforce",
                   help="OpenMM-Torch TorchForce (fast) or openmm.PythonForce (any torch)")


def _system_from_args(args, model):
    traj = structure_for_model(model, args.structure, args.top)
    temperature = _model_temperature(model, args.temperature)
    system, topology, positions = learned_system(
        model, traj, temperature=temperature, forcefield=args.forcefield, weight=args.weight,
        n_replicas=args.replicas, frame=args.frame, constraints=args.constraints,
        backend=args.backend, t_min=args.t_min)
    return system, topology, positions, temperature


def _export_arguments(p) -> None:
    p.add_argument("model", type=_existing_file, help="model file (.pt)")
    p.add_argument("--torchscript", default=None,
                   help="write a TorchScript module for openmmtorch.TorchForce: positions "
                        "(replicas * N, 3) nm -> energy kJ/mol")
    p.add_argument("--outputs-forces", action="store_true",
                   help="the TorchScript module also returns forces (kJ/mol/nm); then call "
                        "force.setOutputsForces(True)")
    p.add_argument("--xml", default=None,
                   help="write an OpenMM System XML with the learned force added (read it "
                        "with openmm.XmlSerializer.deserialize); a PDB of its particles is "
                        "written beside it as <stem>.pdb")
    _add_system_arguments(p)


def _export_run(args) -> int:
    import torch

    from .io import atomic_write
    from .openmm_force import create_force
    from .serialization import serialize_system

    if not (args.torchscript or args.xml):
        raise ValueError("nothing to export: give --torchscript PATH and/or --xml PATH")
    model = _load_model(args.model)
    if args.torchscript:
        temperature = _model_temperature(model, args.temperature)
        force = create_force(model, temperature=temperature * args.weight, t_min=args.t_min,
                             n_replicas=args.replicas, outputs_forces=args.outputs_forces)
        with atomic_write(args.torchscript) as fh:
            torch.jit.save(force.getModule(), fh)
        n = model.n_particles * args.replicas
        print(f"wrote {args.torchscript}: positions ({n}, 3) nm -> energy kJ/mol at "
              f"{temperature:g} K" + (" and forces kJ/mol/nm" if args.outputs_forces else "")
              + f"; use openmmtorch.TorchForce('{args.torchscript}')"
              + (" with setOutputsForces(True)" if args.outputs_forces else ""))
    if args.xml:
        system, topology, positions, _ = _system_from_args(args, model)
        _write_text(args.xml, serialize_system(system))
        pdb = _stem(args.xml) + ".pdb"
        _save_trajectory(pdb, topology, positions[None].astype("float32"))
        print(f"wrote {args.xml} ({system.getNumParticles()} particles, "
              f"{system.getNumForces()} forces) and {pdb}")
    return 0


# ----------------------------------------------------------------------------- simulate

def _simulate_arguments(p) -> None:
    p.add_argument("model", type=_existing_file, help="model file (.pt)")
    _add_system_arguments(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--ns", type=positive_float, default=None,
                        help="length per replica, ns (default 0.01 ns unless --steps)")
    length.add_argument("--steps", type=positive_int, default=None, help="length in steps")
    p.add_argument("--timestep-fs", type=positive_float, default=1.0, help="fs")
    p.add_argument("--friction", type=positive_float, default=1.0, help="Langevin friction, 1/ps")
    p.add_argument("--save-ps", type=positive_float, default=1.0, help="frame interval, ps")
    p.add_argument("--minimize", action="store_true", help="minimize the energy first")
    p.add_argument("--platform", default="auto",
                   help="OpenMM platform; auto: Reference up to 200 particles, else CPU")
    p.add_argument("--seed", type=int, default=0, help="velocities and Langevin noise")
    _add_output_arguments(p, "diffenergy_md.dcd",
                          "trajectory (.dcd, .xtc, .pdb, .h5), all replicas in one file; also "
                          "writes <stem>.pdb (topology), <stem>.csv (energies)",
                          "phi/psi (alanine dipeptide) and the energy trace")


def _simulate_run(args) -> int:
    import numpy as np

    _check_format(args.out, "output")
    _set_threads(args.threads)
    model = _load_model(args.model)
    system, topology, positions, temperature = _system_from_args(args, model)
    n_steps = args.steps or int(round((args.ns or 0.01) * 1e6 / args.timestep_fs))
    save_every = max(1, int(round(args.save_ps * 1000 / args.timestep_fs)))
    md = run_langevin(system, positions, temperature, args.timestep_fs, n_steps, save_every,
                      friction=args.friction, platform=args.platform, seed=args.seed,
                      minimize=args.minimize, progress=not args.no_progress)
    if len(md["xyz"]):
        for path in _save_trajectory(args.out, topology, md["xyz"]):
            print(f"wrote {path}")
        rows = ["time_ps,potential_kj_mol,learned_kj_mol"] + [
            f"{t:.4f},{u:.6f},{e:.6f}" for t, u, e in
            zip(md["time_ps"], md["potential_kj_mol"], md["learned_kj_mol"])]
        _write_text(_stem(args.out) + ".csv", "\n".join(rows) + "\n")
        print(f"wrote {_stem(args.out)}.csv")
    ns = md["steps"] * args.timestep_fs * 1e-6
    rate = md["steps"] / md["seconds"] if md["seconds"] > 0 else float("nan")
    print(f"{md['steps']} steps x {args.replicas} replica(s) at {temperature:g} K, "
          f"{args.timestep_fs:g} fs on {md['platform']}: {ns:g} ns per replica, "
          f"{rate:.0f} steps/s ({rate * args.timestep_fs * 86400e-6:.1f} ns/day per replica)")
    if len(md["xyz"]):
        print(f"learned energy {np.mean(md['learned_kj_mol']):.2f} kJ/mol on average over "
              f"{len(md['xyz'])} frames")
    png = _png_path(args, args.out)
    if png and len(md["xyz"]):
        _simulate_png(png, topology, md, temperature)
    if md["error"]:
        kept = f"; the {len(md['xyz'])} frames before it were written" if len(md["xyz"]) else ""
        raise RuntimeError(f"{md['error']}{kept}; try a smaller --timestep-fs or --minimize")
    return 0


def _simulate_png(path, topology, md, temperature) -> None:
    import numpy as np

    pp = alanine_dihedrals(topology, md["xyz"])
    with _figure(path, 2 if pp is not None else 1, size=(5.0, 4.3)) as axes:
        if pp is not None:
            _ramachandran(axes[0], pp, f"learned-force MD, {temperature:g} K, "
                                       f"{len(pp)} samples")
        ax = axes[-1]
        ax.plot(md["time_ps"], md["learned_kj_mol"], label="learned")
        if not np.allclose(md["potential_kj_mol"], md["learned_kj_mol"]):
            ax.plot(md["time_ps"], md["potential_kj_mol"], label="total potential")
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("energy (kJ/mol)")
        ax.legend(fontsize=8)


# ----------------------------------------------------------------------------- nll

def _divergences() -> list:
    from .divergence import get_estimator

    names = ["exact", "hutchinson"]
    try:
        get_estimator("fast")
        names.append("fast")
    except (ValueError, ImportError, RuntimeError):
        pass
    return names


class _LazyChoices(list):
    """argparse choices computed when first needed (importing torch only then)."""

    def __init__(self, compute):
        super().__init__()
        self._compute = compute
        self._done = False

    def _fill(self):
        if not self._done:
            self.extend(self._compute())
            self._done = True

    def __contains__(self, item):
        self._fill()
        return super().__contains__(item)

    def __iter__(self):
        self._fill()
        return super().__iter__()

    def __len__(self):
        self._fill()
        return super().__len__()


def _nll_arguments(p) -> None:
    p.add_argument("model", type=_existing_file, help="model file (.pt)")
    p.add_argument("structures", nargs="+",
                   help="structures: PDB, DCD, XTC or any mdtraj format (nm)")
    p.add_argument("--top", default=None, help="topology (PDB) for DCD/XTC input")
    p.add_argument("--stride", type=positive_int, default=1, help="keep every n-th frame")
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="evaluate at most this many frames (after --stride)")
    p.add_argument("--path", choices=["flow", "diffusion"], default="flow",
                   help="probability-flow ODE, or a forward-SDE diffusion path")
    p.add_argument("--divergence", choices=_LazyChoices(_divergences), default="exact",
                   help="divergence estimator: exact (one Jacobian row per dimension), "
                        "hutchinson (stochastic trace), fast (exact, forward Laplacian; "
                        "where the installed package has it)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="RK4 steps of the flow (default 100) or path steps (default 200)")
    p.add_argument("--solver", choices=["rk4", "dopri5", "bosh3", "adaptive_heun"],
                   default="rk4", help="flow ODE solver")
    p.add_argument("--n-probes", type=positive_int, default=1, help="Hutchinson probes")
    p.add_argument("--seed", type=int, default=0, help="probes and diffusion-path noise")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="frames per integration")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="precision of the integration")
    p.add_argument("--t-min", type=nonnegative_float, default=None,
                   help="start time of the integral (default: the model's t_min)")
    _add_output_arguments(p, "nll.csv",
                          "per-frame results, .csv or .json: -log p0 (nats, density per nm^D), "
                          "the same in model units, and the learned energy E(x, t_min) in kT",
                          "the histogram of -log p0")


def _nll_run(args) -> int:
    import torch

    from .likelihood import nll

    if not args.out.lower().endswith((".csv", ".json")):
        raise ValueError(f"--out {args.out}: results are written as .csv or .json")
    _set_threads(args.threads)
    model = _load_model(args.model)
    traj = load_structures(args.structures, args.top, args.stride)
    if args.max_frames:
        traj = traj[:args.max_frames]
    cg = particle_mapping(model, traj.topology)
    dtype = getattr(torch, args.dtype)
    x = torch.tensor(cg.map_positions(traj.xyz), dtype=dtype)
    res = nll(model, None, x, path=args.path, divergence=args.divergence, steps=args.steps,
              seed=args.seed, solver=args.solver, n_probes=args.n_probes, t_min=args.t_min,
              batch_size=args.batch_size, progress=not args.no_progress)
    t_min = res.method["t_min"]
    with torch.no_grad():
        y = model.to_model_coordinates(x.to(next(model.parameters()).dtype))
        energy = model(y, torch.full((len(x),), t_min, dtype=y.dtype)).double()
    columns = {"frame": list(range(len(x))), "nll": res.nll.tolist(),
               "nll_model": res.nll_model.tolist(), "energy_kT": energy.tolist()}
    method = {k: v for k, v in res.method.items() if isinstance(v, (int, float, str, type(None)))}
    if args.out.lower().endswith(".json"):
        payload = {"model": os.path.abspath(args.model), "structures": args.structures,
                   "units": {"nll": "nats, density per nm^D", "nll_model": "nats, x / s",
                             "energy_kT": "kT"}, "method": method, **columns}
        _write_text(args.out, json.dumps(payload, indent=1) + "\n")
    else:
        rows = ["frame,nll,nll_model,energy_kT"] + [
            f"{f},{a:.6f},{b:.6f},{c:.6f}" for f, a, b, c in zip(*columns.values())]
        _write_text(args.out, "\n".join(rows) + "\n")
    v = res.nll
    print(f"-log p0 of {len(v)} frames ({args.path}, {res.method.get('estimator', '')}, "
          f"{res.method['seconds']:.1f} s): mean {v.mean():.3f}, std "
          f"{v.std() if len(v) > 1 else 0.0:.3f}, min {v.min():.3f}, max {v.max():.3f} nats")
    print(f"wrote {args.out}")
    png = _png_path(args, args.out)
    if png:
        with _figure(png) as (ax,):
            ax.hist(v.numpy(), bins=max(5, min(50, len(v) // 3)))
            ax.set_xlabel("-log p0(x)  (nats; density per nm^D)")
            ax.set_ylabel("frames")
            ax.set_title(f"{os.path.basename(args.model)}: {args.path}, {args.divergence}")
    return 0


# ----------------------------------------------------------------------------- the list

for _command in (
        Command("generate-data", "alanine-dipeptide reference MD with amber14 (.npz, DCD/XTC)",
                _generate_data_arguments, _generate_data_run,
                "Run amber14 Langevin MD of alanine dipeptide (built from internal coordinates; "
                "nothing downloaded) and write the frames as the package's reference .npz, "
                "optionally also as a trajectory and a phi/psi PNG. Resumable."),
        Command("train", "train an energy model on MD frames",
                _train_arguments, _train_run,
                "Train a MoleculeEnergy by denoising score matching on frames of any "
                "trajectory mdtraj reads, mapped to particles (all atoms, heavy atoms, "
                "backbone, C-alpha, a selection or bead groups). Checkpoints beside --out and "
                "resumes when rerun."),
        Command("export", "model -> TorchScript for TorchForce and/or OpenMM System XML",
                _export_arguments, _export_run),
        Command("simulate", "Langevin MD with the learned force (DCD/XTC/PDB, CSV, PNG)",
                _simulate_arguments, _simulate_run,
                "Langevin MD (LangevinMiddleIntegrator) driven by the learned force "
                "U = weight * kT * E(x, t_min), alone (with replicas) or beside a classical "
                "force field."),
        Command("nll", "-log p0 of structures (PDB/DCD/XTC) -> CSV/JSON and a histogram",
                _nll_arguments, _nll_run,
                "Per-frame negative log-likelihood -log p0(x) along the probability-flow ODE "
                "or a diffusion path, with the learned energy E(x, t_min)."),
):
    register(_command)

from . import cli_analysis  # noqa: E402,F401  (registers demo, reweight and compare)


if __name__ == "__main__":
    sys.exit(main())
