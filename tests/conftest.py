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


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    """``FILE:build`` of a tiny classifier for the CLI: window 16 (every pixel of it
    seen), stride 4, no padding, 3 classes, so map cells equal crops."""
    d = tmp_path_factory.mktemp("model")
    (d / "tiny.py").write_text(
        "import torch.nn as nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 4, stride=2), nn.ReLU(),\n"
        "                         nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(54, 3))\n")
    return f"{d / 'tiny.py'}:build"
