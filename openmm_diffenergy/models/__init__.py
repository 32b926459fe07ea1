"""Energy models: the interface and the analytic Gaussian mixtures."""
from .base import EnergyModel, score, score_fn
from .gaussian_mixture import GaussianMixtureEnergy, mixture_1d, mixture_2d, particle_mixture
from .mlp import DistanceMLPEnergy
from .molecule import MoleculeEnergy, torsion_quadruples

__all__ = ["EnergyModel", "score", "score_fn", "GaussianMixtureEnergy", "mixture_1d",
           "mixture_2d", "particle_mixture", "DistanceMLPEnergy",
           "MoleculeEnergy", "torsion_quadruples"]
