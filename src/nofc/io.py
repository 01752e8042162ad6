"""Loading models safely and writing outputs without losing work."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .errors import NofcError, first_line, refuse_overwrite
from .zoo import MODELS

__all__ = ["load_model", "parse_size", "atomic_output", "default_input_size"]


def parse_size(text: str, *, n: int = 3, what: str = "--input-size") -> tuple[int, ...]:
    """``"3x224x224"`` -> ``(3, 224, 224)``.

    >>> parse_size("3x224x224")
    (3, 224, 224)
    """
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n or min(values, default=0) < 1:
        example = "3x224x224" if n == 3 else "384x384"
        raise NofcError(f"{what} must be {n} positive integers like {example}, got {text!r}")
    return values


def _load_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise NofcError(f"weights file not found: {path}")
    if p.stat().st_size == 0:
        raise NofcError(f"weights file is empty: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        # torch names the global two ways: "Unsupported global: GLOBAL os.system" and
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:  # a real pickle of Python objects; garbage also fails with "weights_only"
            raise NofcError(
                f"{path} holds pickled Python objects ({found.group(1)}), refused: a "
                "weights file is loaded with weights_only=True so that it cannot run code. "
                "Save model.state_dict() instead (a whole pickled model you trust can be "
                "given as MODEL with --trust-pickle)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
        # never torch's advice to retry with weights_only=False: that runs the file's code
        lines = [line.strip() for line in text.splitlines() if line.strip()
                 and "weights_only" not in line and "Weights only load failed" not in line
                 and "documentation of torch.load" not in line]
        first = detail.group(1) if detail else lines[0] if lines else type(exc).__name__
        raise NofcError(f"cannot read weights from {path}: not a PyTorch weights file "
                        f"({type(exc).__name__}: {first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NofcError(f"{path} is not a state_dict (a dict of tensors)")
    return obj


def _apply_state_dict(model: nn.Module, sd: dict, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrongly shaped (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise NofcError(f"state_dict {path} does not fit {type(model).__name__}: "
                        + "; ".join(problems))
    model.load_state_dict(sd)


def _import_factory(spec: str) -> nn.Module:
    file, _, factory = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise NofcError(f"model file not found: {file} (MODEL is torchvision:NAME or "
                        "path/to/file.py:factory)")
    mod_name = f"_nofc_user_{abs(hash(str(path.resolve())))}"
    try:
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        spec_obj.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"cannot import {file}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, factory, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise NofcError(f"{file} has no '{factory}'; callables there: "
                       f"{', '.join(names[:10]) or 'none'}")
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"{file}:{factory}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise NofcError(f"{file}:{factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build the model a CLI user names, in eval mode.

    ``spec`` is ``torchvision:NAME`` or ``timm:NAME`` (random weights; timm's pretrained
    config, with its mean, std and input size, stays on the model as ``pretrained_cfg``),
    ``nofc:NAME`` (models shipped with nofc, such as ``nofc:lenet5``),
    ``path/to/file.py:factory`` (the factory is called with no arguments) or a ``.pt``
    file holding a whole pickled model, which is refused unless ``trust_pickle``
    (unpickling can run arbitrary code).
    ``weights`` is a state_dict file, always loaded with ``weights_only=True``.

    >>> load_model("torchvision:resnet18").fc.out_features
    1000
    """
    spec = str(spec)
    if spec.startswith("nofc:"):
        name = spec.split(":", 1)[1]
        if name not in MODELS:
            raise NofcError(f"unknown nofc model '{name}'; nofc ships: {', '.join(MODELS)}")
        model = MODELS[name]()
    elif spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            close = [a for a in available if name.lower()[:4] in a][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise NofcError(f"unknown torchvision model '{name}'{hint}")
        model = torchvision.models.get_model(name, weights=None)
    elif spec.startswith("timm:"):
        model = _timm_model(spec.split(":", 1)[1])
    elif spec.endswith((".pt", ".pth", ".ckpt")) and ":" not in Path(spec).name:
        path = Path(spec)
        if not path.is_file():
            raise NofcError(f"model file not found: {spec}")
        if path.stat().st_size == 0:
            raise NofcError(f"model file is empty: {spec}")
        if not trust_pickle:
            raise NofcError(
                f"{spec} would be unpickled to build the model, and unpickling can run "
                "arbitrary code; pass --trust-pickle if you trust it, or give the "
                "architecture as torchvision:NAME or file.py:factory with --weights FILE"
            )
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"cannot load {spec}: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise NofcError(f"{spec} holds a {type(model).__name__}, not an nn.Module; "
                            "use file.py:factory with --weights for a state_dict")
    elif ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        model = _import_factory(spec)
    elif spec.lower().endswith(".onnx"):
        raise NofcError(f"{spec} is an ONNX model: only `nofc convert {spec} --input-size CxHxW "
                        "-o out.onnx` reads ONNX (nofc.convert_onnx); the other commands need "
                        "a PyTorch model")
    else:
        raise NofcError(f"cannot tell what model {spec!r} is: use torchvision:NAME, timm:NAME, "
                        "path/to/file.py:factory or a pickled model .pt with --trust-pickle")
    if weights is not None:
        _apply_state_dict(model, _load_state_dict(weights), weights)
    return model.eval()


def _timm_model(name: str) -> nn.Module:
    """``timm.create_model(name)`` with random weights, or a NofcError naming close names."""
    try:
        import timm
    except ImportError:
        raise NofcError(f"timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:5]}*")[:5] if name else []
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise NofcError(f"unknown timm model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"timm cannot build '{name}': {type(exc).__name__}: "
                        f"{first_line(exc)}") from None


def default_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` a timm model's pretrained config names (None for other models).

    >>> default_input_size(load_model("timm:resnet18"))
    (3, 224, 224)
    """
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(int(s) for s in size) if size is not None and len(size) == 3 else None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False):
    """Yield a temporary path next to ``path``; rename it into place on success.

    An existing ``path`` is refused unless ``force``; on any error (or Ctrl-C) the
    temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    refuse_overwrite(target, force=force)
    if target.is_dir():
        raise NofcError(f"{target} is a directory, not a file path")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise NofcError(f"cannot write {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise NofcError(f"cannot write {target}: folder {folder} is not writable")
    try:  # root passes os.access on read-only mounts (/sys, ro bind mounts): try for real
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".part{target.suffix}",
                                   dir=folder)
    except OSError as exc:
        raise NofcError(f"cannot write {target}: {exc.strerror or exc} in {folder}") from None
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, NofcError):  # disk full, ...
            raise NofcError(f"cannot write {target}: {exc.strerror or exc}; "
                            f"{'it was left as it was' if target.exists() else 'nothing was written'}"
                            ) from None
        raise
