import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch


def state_hash(model: torch.nn.Module) -> str:
    """Hash of parameters, buffers and training flags: proves a model was not touched."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(str(t.requires_grad).encode())
    for name, m in model.named_modules():
        h.update(f"{name}:{m.training}".encode())
    return h.hexdigest()


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="thorough runs: HYPOTHESIS_PROFILE=slow for tests/test_properties.py")


def pytest_configure(config):
    if config.getoption("--slow", default=False):
        import os

        os.environ["HYPOTHESIS_PROFILE"] = "slow"  # read when test_properties.py is imported


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
