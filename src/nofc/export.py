"""Writing converted models: TorchScript (.pt). ONNX and torch.export come with the interop work."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import NofcError
from .io import atomic_output

__all__ = ["save_model", "to_torchscript"]


def to_torchscript(fcn: nn.Module) -> torch.jit.ScriptModule:
    """Script the converted model; the result runs at any input size >= the window.

    >>> import torch, torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.resnet18(), input_size=(3, 64, 64))
    >>> to_torchscript(fcn)(torch.randn(1, 3, 96, 96)).shape
    torch.Size([1, 1000, 2, 2])
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(fcn.eval())
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise NofcError(f"TorchScript cannot compile the converted model: {first}") from None


def save_model(fcn: nn.Module, path, *, input_size, force: bool = False) -> str:
    """Write ``fcn`` to ``path`` by its suffix; returns a word for the format written."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pt":
        scripted = to_torchscript(fcn)
        with atomic_output(path, force=force) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(scripted, tmp)
        return "TorchScript"
    raise NofcError(f"unknown output format {suffix!r} for {path}: use .pt (TorchScript)")
