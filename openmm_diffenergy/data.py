"""Training data from MD trajectories: loading through mdtraj, mappings, centring, scale.

A mapping names which particles a model sees: ``"all"``, ``"heavy"`` (no hydrogens),
``"backbone"``, ``"ca"``, any mdtraj selection string, or explicit bead groups (lists of
atom indices) placed at their centres of mass (:class:`~openmm_diffenergy.systems.CoarseGraining`).
Positions are centred on their centroid, the convention of the models' centroid-free
subspace (DESIGN.md section 4), and the suggested length scale is their RMS per
coordinate, so that the model coordinates have unit variance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .systems import CoarseGraining

__all__ = ["TrainingData", "load_training_data", "NAMED_MAPPINGS"]

NAMED_MAPPINGS = {"all": "all", "heavy": "not element H", "backbone": "backbone",
                  "ca": "name CA"}


@dataclass
class TrainingData:
    """Mapped, centred positions ready for :func:`openmm_diffenergy.train`.

    Attributes
    ----------
    positions : torch.Tensor, shape (F, n, 3), float32, nm, centroid at the origin
    mapping : CoarseGraining
        The atoms-to-particles map (its ``masses``, ``topology``, ``groups``).
    length_scale : float
        RMS of the centred positions per coordinate, nm.
    """

    positions: torch.Tensor
    mapping: CoarseGraining
    length_scale: float


def load_training_data(trajectories, top=None, mapping="all", stride: int = 1) -> TrainingData:
    """Load MD frames with mdtraj and map them to the model's particles.

    Parameters
    ----------
    trajectories : str, list of str, or mdtraj.Trajectory
        Any format mdtraj reads (DCD, XTC, HDF5, PDB, ...).
    top : str or mdtraj.Topology, optional
        Topology for formats without one.
    mapping : str or sequence of sequences of int
        A name in ``NAMED_MAPPINGS``, an mdtraj selection, or bead groups.
    stride : int
        Keep every ``stride``-th frame.
    """
    import mdtraj

    if isinstance(trajectories, mdtraj.Trajectory):
        traj = trajectories[::stride]
    else:
        files = [trajectories] if isinstance(trajectories, str) else list(trajectories)
        if not files:
            raise ValueError("no trajectory files given")
        kwargs = {"stride": stride}
        if top is not None:
            kwargs["top"] = top
        try:
            traj = mdtraj.load(files, **kwargs)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"cannot load {files}: {err}") from None
    if traj.n_frames == 0:
        raise ValueError("the trajectories hold no frames")
    if isinstance(mapping, str):
        mapping = NAMED_MAPPINGS.get(mapping, mapping)
    cg = CoarseGraining(traj.topology, mapping)
    x = cg.map_positions(traj.xyz)
    if not np.isfinite(x).all():
        raise ValueError("the trajectories hold NaN or inf positions")
    x = x - x.mean(axis=1, keepdims=True)
    scale = float(np.sqrt((x ** 2).mean()))
    return TrainingData(torch.tensor(x, dtype=torch.float32), cg, scale)
