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
from .divergence import (ExactDivergence, FastDivergence, FusedHutchinsonDivergence,
                         HutchinsonDivergence, get_estimator)
from .likelihood import NLLResult, SampleResult, nll, path_nll, sample
from .mcmc import mala
from .annealing import AnnealingResult, ClassicalEnergy, anneal
from .io import load_model, save_model
from .models import (DistanceMLPEnergy, EnergyModel, MoleculeEnergy, torsion_quadruples, GaussianMixtureEnergy, mixture_1d,
                     mixture_2d, particle_mixture, score, score_fn)
from .openmm_force import (LEARNED_FORCE_GROUP, LEARNED_SCALE, add_learned_force, create_force,
                           kt_kj_per_mol, learned_energy, scaled_force)
from .sde import LinearSDE, VESDE, VPSDE, sde_from_config
from .reweighting import (FreeEnergyDifference, FreeEnergyProfile, ReweightingResult, collective_variable,
                          ess, free_energy_from_energies, free_energy_profile, importance_weights,
                          lambda_free_energy, log_importance_weights, model_energies, potential_energies,
                          potential_forces,
                          profile_rmse, reduced_energies, reweight_iid, reweight_md, run_learned_md,
                          sample_with_likelihood)
from .flow import denoise, flow_log_density, folded_log_density, mirror_fold
from .compare import EnergyComparison, compare_energies, correlation, decoy_ranking, rmsd_to_reference
from .serialization import deserialize_system, serialize_system
from .systems import CoarseGraining, replicate_system, split_replicas
from .training import TrainConfig, dsm_loss, fp_residual, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LinearSDE", "VPSDE", "VESDE", "sde_from_config",
    "EnergyModel", "GaussianMixtureEnergy", "mixture_1d", "mixture_2d", "particle_mixture",
    "DistanceMLPEnergy", "MoleculeEnergy", "torsion_quadruples", "save_model", "load_model",
    "create_force", "add_learned_force", "learned_energy", "kt_kj_per_mol", "scaled_force",
    "LEARNED_FORCE_GROUP", "LEARNED_SCALE",
    "CoarseGraining", "replicate_system", "split_replicas",
    "serialize_system", "deserialize_system",
    "TrainConfig", "train", "dsm_loss", "fp_residual", "TrainingData", "load_training_data",
    "score", "score_fn",
    "ExactDivergence", "HutchinsonDivergence", "FastDivergence", "FusedHutchinsonDivergence",
    "get_estimator",
    "NLLResult", "SampleResult", "nll", "path_nll", "sample", "mala",
    "anneal", "AnnealingResult", "ClassicalEnergy",
    "centre", "check_time", "dof", "subspace_basis",
    "importance_weights", "log_importance_weights", "ess", "potential_energies", "potential_forces",
    "reduced_energies",
    "model_energies", "collective_variable", "FreeEnergyProfile", "free_energy_profile", "profile_rmse",
    "sample_with_likelihood", "flow_log_density", "folded_log_density", "mirror_fold",
    "denoise",
    "run_learned_md", "ReweightingResult", "reweight_iid", "reweight_md",
    "FreeEnergyDifference", "free_energy_from_energies", "lambda_free_energy",
    "EnergyComparison", "compare_energies", "correlation", "decoy_ranking", "rmsd_to_reference",
]
