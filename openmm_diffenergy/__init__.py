"""openmm_diffenergy: diffusion models of molecules as physics inside OpenMM.

The public contract (see the README)::

    import openmm_diffenergy as de
    sde = de.VPSDE()
    gm = de.GaussianMixtureEnergy(means, covariances, weights, sde)
    e = gm.energy(x, t)             # kT
    s = de.score(gm, x, t)          # -grad_x E
    res = de.nll(gm, sde, x, path="flow", divergence="exact")
"""
from .coordinates import centre, check_time, dof, subspace_basis
from .data import TrainingData, load_training_data
from .divergence import ExactDivergence, HutchinsonDivergence, get_estimator
from .likelihood import NLLResult, SampleResult, nll, path_nll, sample
from .io import load_model, save_model
from .models import (DistanceMLPEnergy, EnergyModel, MoleculeEnergy, torsion_quadruples, GaussianMixtureEnergy, mixture_1d,
                     mixture_2d, particle_mixture, score, score_fn)
from .openmm_force import add_learned_force, create_force, kt_kj_per_mol, learned_energy
from .sde import LinearSDE, VESDE, VPSDE, sde_from_config
from .serialization import deserialize_system, serialize_system
from .systems import CoarseGraining, replicate_system, split_replicas
from .training import TrainConfig, dsm_loss, fp_residual, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LinearSDE", "VPSDE", "VESDE", "sde_from_config",
    "EnergyModel", "GaussianMixtureEnergy", "mixture_1d", "mixture_2d", "particle_mixture",
    "DistanceMLPEnergy", "MoleculeEnergy", "torsion_quadruples", "save_model", "load_model",
    "create_force", "add_learned_force", "learned_energy", "kt_kj_per_mol",
    "CoarseGraining", "replicate_system", "split_replicas",
    "serialize_system", "deserialize_system",
    "TrainConfig", "train", "dsm_loss", "fp_residual", "TrainingData", "load_training_data",
    "score", "score_fn",
    "ExactDivergence", "HutchinsonDivergence", "get_estimator",
    "NLLResult", "SampleResult", "nll", "path_nll", "sample",
    "centre", "check_time", "dof", "subspace_basis",
]
