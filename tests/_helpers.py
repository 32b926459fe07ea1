"""Shared by the tests: the repository root and a loader for scripts outside the package."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(relpath):
    """Import a script of the repository (examples/, benchmarks/, scripts/) as a module."""
    path = os.path.join(ROOT, relpath)
    spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
