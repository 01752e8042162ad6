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

__all__ = ["load_model", "parse_size", "atomic_output", "default_input_size", "head_classes"]


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


_NESTED = ("state_dict", "model", "state_dict_ema", "model_ema", "module", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")


def _load_checkpoint(path: str) -> tuple[dict, dict]:
    """The state_dict in a weights file as people save it, and what it keeps beside the
    weights: ``{"classes": [...], "mean": (...), "std": (...)}`` where it has them.

    ``.pt``/``.pth``/``.ckpt`` through ``torch.load(weights_only=True)`` (a file cannot run
    code), ``.safetensors`` through safetensors. A dict that is not itself a state_dict is
    searched for one under ``state_dict`` (Lightning), ``model``, ``state_dict_ema``,
    ``model_ema``, ``module`` or ``net``; class names under ``classes`` or
    ``class_names``, the per-band normalisation under ``mean`` and ``std`` (or in
    Lightning's ``hyper_parameters``).
    """
    p = Path(path)
    if not p.is_file():
        raise NofcError(f"weights file not found: {path}")
    if p.stat().st_size == 0:
        raise NofcError(f"weights file is empty: {path}")
    if p.suffix.lower() == ".safetensors":
        return _load_safetensors(p), {}
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
    names = _stored_names(obj)
    kept = {**({"classes": names} if names else {}), **_stored_stats(obj)}
    sd = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        inner = [obj[k] for k in _NESTED if isinstance(obj.get(k), dict) and _is_state_dict(obj[k])]
        sd = inner[0] if inner else obj
    if not isinstance(sd, dict) or not _is_state_dict(sd):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else ""
        raise NofcError(f"{path} is not a state_dict (a dict of tensors)"
                        + (f"; its keys: {keys}, none of {', '.join(_NESTED)} holds one"
                           if keys else ""))
    return sd, kept


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                           for k, v in d.items())


def _stored(obj, keys, ok):
    """The first value under one of ``keys`` in a checkpoint dict (or its Lightning
    ``hyper_parameters``) that ``ok`` accepts, else None."""
    if not isinstance(obj, dict):
        return None
    for holder in (obj, obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"),
                                                                 dict) else {}):
        for key in keys:
            value = holder.get(key)
            if isinstance(value, (list, tuple)) and value and ok(value):
                return list(value)
    return None


def _stored_names(obj) -> list[str] | None:
    """Class names kept beside the weights, when a list of strings is there."""
    return _stored(obj, ("classes", "class_names"), lambda v: all(isinstance(n, str)
                                                                   for n in v))


def _stored_stats(obj) -> dict:
    """The per-band ``mean`` and ``std`` the model was trained with, when the checkpoint
    keeps both (lists of numbers of the same length): ``{"mean": [...], "std": [...]}``."""
    def numbers(v):
        return all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v)

    mean, std = _stored(obj, ("mean",), numbers), _stored(obj, ("std",), numbers)
    return {"mean": tuple(mean), "std": tuple(std)} if mean and std and \
        len(mean) == len(std) else {}


def _load_safetensors(p: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - timm brings it
        raise NofcError(f"reading {p.name} needs safetensors: pip install safetensors") from None
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise NofcError(f"cannot read weights from {p}: not a safetensors file "
                        f"({type(exc).__name__}: {first_line(exc)})") from None


def _fitted_keys(sd: dict, own: dict) -> dict:
    """``sd`` with the wrapper prefixes (``module.`` of DDP, ``model.`` of Lightning,
    ``_orig_mod.`` of torch.compile) stripped where that makes more keys fit the model.

    >>> _fitted_keys({"module.model.fc.weight": 1}, {"fc.weight": 0})
    {'fc.weight': 1}
    """
    best = sd
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in best):
                stripped = {k[len(prefix):]: v for k, v in best.items()}
                if len(own.keys() & stripped.keys()) >= len(own.keys() & best.keys()):
                    best, changed = stripped, True
    if not own.keys() & best.keys():  # a Lightning module that keeps other things beside
        for prefix in _PREFIXES:
            part = {k[len(prefix):]: v for k, v in best.items() if k.startswith(prefix)}
            if len(own.keys() & part.keys()) > len(own.keys() & best.keys()):
                best = part
    return best


def head_classes(sd: dict, own: dict) -> int | None:
    """The number of classes of a checkpoint whose only difference from the model is the
    size of its classifier: every wrongly shaped tensor has the model's class count as
    its first dimension and one other count in the file. None when that is not so.

    >>> head_classes({"fc.weight": torch.zeros(2, 8), "fc.bias": torch.zeros(2)},
    ...              {"fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)})
    2
    """
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not wrong or set(sd) != set(own):
        return None
    firsts = {tuple(own[k].shape)[:1] + tuple(sd[k].shape)[:1] for k in wrong}
    rest_same = all(tuple(own[k].shape)[1:] == tuple(sd[k].shape)[1:] for k in wrong)
    if len(firsts) != 1 or not rest_same:
        return None
    return int(next(iter(firsts))[1])


def _apply_state_dict(model: nn.Module, sd: dict, path: str, rebuild=None) -> nn.Module:
    """Load ``sd`` into ``model`` (prefixes fitted), or into ``rebuild(n)`` when the file's
    classifier has ``n`` classes; one NofcError naming the keys that differ otherwise."""
    own = model.state_dict()
    sd = _fitted_keys(sd, own)
    n = head_classes(sd, own)
    if n is not None and rebuild is not None:
        model = rebuild(n)
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
        hint = (f"; a classifier of {n} classes: give --num-classes {n} with a model that "
                "takes it (torchvision:NAME, timm:NAME)" if n is not None and rebuild is None
                else "")
        raise NofcError(f"state_dict {path} does not fit {type(model).__name__}: "
                        + "; ".join(problems) + hint)
    model.load_state_dict(sd)
    return model


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


def load_model(spec: str, *, weights: str | None = None, num_classes: int | None = None,
               pretrained: bool = False, trust_pickle: bool = False) -> nn.Module:
    """Build the model a CLI user names, in eval mode.

    ``spec`` is ``torchvision:NAME`` or ``timm:NAME`` (random weights; timm's pretrained
    config, with its mean, std and input size, stays on the model as ``pretrained_cfg``),
    ``nofc:NAME`` (models shipped with nofc, such as ``nofc:lenet5``),
    ``torchvision:NAME.WEIGHTS`` / ``timm:NAME.TAG`` or ``pretrained`` (the library's own
    pretrained weights, read from its cache, never downloaded: a missing file is one line
    naming it and where it goes; mean, std, input size and class names come with them),
    ``path/to/file.py:factory`` (the factory is called with no arguments) or a ``.pt``
    file holding a whole pickled model, which is refused unless ``trust_pickle``
    (unpickling can run arbitrary code).
    ``weights`` is a checkpoint as saved (``.pt``, ``.pth``, ``.ckpt``, ``.safetensors``;
    a Lightning or EMA dict; DDP's ``module.`` and Lightning's ``model.`` prefixes), always
    loaded with ``weights_only=True``. ``num_classes`` builds a torchvision or timm model
    with that head; without it the head is sized from the checkpoint's classifier. Class
    names kept in the checkpoint (``classes``) go to ``model.nofc_class_names``, its
    ``mean`` and ``std`` (per band) to ``model.pretrained_cfg`` (the normalisation
    ``nofc heatmap`` uses by default).

    >>> load_model("torchvision:resnet18").fc.out_features
    1000
    >>> load_model("torchvision:resnet18", num_classes=3).fc.out_features
    3
    """
    spec = str(spec)
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, int) or num_classes < 1):
        raise NofcError(f"--num-classes must be a positive number, got {num_classes!r}")
    rebuild = None
    if spec.startswith("nofc:"):
        name = spec.split(":", 1)[1]
        if name not in MODELS:
            raise NofcError(f"unknown nofc model '{name}'; nofc ships: {', '.join(MODELS)}")
        model = MODELS[name]()
    elif spec.startswith("torchvision:"):
        import torchvision

        name, _, tag = spec.split(":", 1)[1].partition(".")
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            close = [a for a in available if name.lower()[:4] in a][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise NofcError(f"unknown torchvision model '{name}'{hint}")
        def rebuild(n):
            return torchvision.models.get_model(name, weights=None, num_classes=n)

        model = torchvision.models.get_model(name, weights=None) if num_classes is None \
            else rebuild(num_classes)
        if tag or pretrained:
            _torchvision_pretrained(model, name, tag or "DEFAULT", num_classes)
    elif spec.startswith("timm:"):
        name = spec.split(":", 1)[1]

        def rebuild(n):
            return _timm_model(name, num_classes=n)

        if "." in name or pretrained:
            model = _timm_pretrained(name, num_classes)
        else:
            model = _timm_model(name, num_classes=num_classes)
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
        raise NofcError(f"{spec} is an ONNX model: `nofc heatmap` and `nofc convert` read ONNX "
                        "(nofc.onnx_net, nofc.convert_onnx); the other commands need a PyTorch "
                        "model")
    else:
        raise NofcError(f"cannot tell what model {spec!r} is: use torchvision:NAME, timm:NAME, "
                        "path/to/file.py:factory or a pickled model .pt with --trust-pickle")
    if pretrained and not spec.startswith(("torchvision:", "timm:")):
        raise NofcError(f"--pretrained applies to torchvision:NAME and timm:NAME models, not "
                        f"{spec}; give a weights file with --weights")
    if num_classes is not None and rebuild is None:
        raise NofcError(f"--num-classes applies to torchvision:NAME and timm:NAME models; "
                        f"{spec} builds its own head")
    if weights is not None:
        sd, kept = _load_checkpoint(weights)
        model = _apply_state_dict(model, sd, weights, rebuild=None if num_classes else rebuild)
        if "classes" in kept:
            model.nofc_class_names = kept["classes"]
        if "mean" in kept:  # the fine-tune's own statistics win over the base config's
            model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}),
                                    "mean": kept["mean"], "std": kept["std"]}
    return model.eval()


def _timm_model(name: str, num_classes: int | None = None) -> nn.Module:
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
        return timm.create_model(name, pretrained=False,
                                 **({} if num_classes is None else {"num_classes": num_classes}))
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"timm cannot build '{name}': {type(exc).__name__}: "
                        f"{first_line(exc)}") from None


def _torchvision_pretrained(model: nn.Module, name: str, tag: str, num_classes) -> None:
    """Load torchvision's ``tag`` weights of ``name`` from torch hub's cache into ``model``;
    its transforms' mean, std and crop size and its categories stay on the model."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if tag not in enum.__members__:
        raise NofcError(f"torchvision:{name} has weights {', '.join(enum.__members__)}, not "
                        f"{tag!r}")
    w = enum[tag]
    categories = list(w.meta.get("categories") or [])
    if num_classes is not None and num_classes != len(categories):
        raise NofcError(f"torchvision:{name}.{w.name} has {len(categories)} classes; "
                        f"--num-classes {num_classes} needs a fine-tuned --weights file")
    file = _hub_file(w.url)
    if not file.is_file():
        raise NofcError(f"torchvision:{name}.{w.name} weights are not in torch hub's cache: "
                        f"put {w.url} at {file} (nofc never downloads; or give "
                        "--weights FILE)")
    sd, _ = _load_checkpoint(str(file))
    _apply_state_dict(model, sd, str(file))
    t = w.transforms()
    crop = getattr(t, "crop_size", None) or [w.meta.get("min_size", (224, 224))[0]]
    model.pretrained_cfg = {"mean": tuple(t.mean), "std": tuple(t.std),
                            "input_size": (3, int(crop[0]), int(crop[-1]))}
    model.nofc_class_names = categories


def _timm_pretrained(name: str, num_classes) -> nn.Module:
    """A timm model with its pretrained weights from the Hugging Face (or torch hub)
    cache, never downloaded; ImageNet class names when its head is ImageNet's."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is said by _timm_model
        cfg = None
    if cfg is None:
        _timm_model(name)  # raises the one line naming close names
        raise NofcError(f"timm:{name} has no pretrained weights; drop the tag or give "
                        "--weights FILE")
    file = _timm_cached_file(cfg)
    if file is None:
        where = (f"huggingface-cli download {cfg.hf_hub_id}" if cfg.hf_hub_id
                 else f"put {cfg.url} at {_hub_file(cfg.url)}")
        raise NofcError(f"timm:{name} pretrained weights are not in the local cache; nofc "
                        f"never downloads: fetch them ({where}) or give --weights FILE")
    try:
        model = timm.create_model(name, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(file)},
                                  **({} if num_classes is None else {"num_classes": num_classes}))
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"timm cannot load {file} into '{name}': {type(exc).__name__}: "
                        f"{first_line(exc)}") from None
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() == model.num_classes:
            model.nofc_class_names = list(info.label_descriptions())
    return model


def _hub_file(url: str) -> Path:
    """Where torch hub keeps the file of ``url`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _timm_cached_file(cfg) -> Path | None:
    """The cached weights of a timm pretrained config: in the Hugging Face cache (its
    safetensors or bin file) or in torch hub's checkpoints folder."""
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else
                         ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        file = _hub_file(cfg.url)
        if file.is_file():
            return file
    return None


def default_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` a timm model's pretrained config names, or torchvision pretrained
    weights' crop size (None for other models).

    >>> default_input_size(load_model("timm:resnet18"))
    (3, 224, 224)
    """
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(int(s) for s in size) if size is not None and len(size) == 3 else None


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False):
    """Yield a temporary path next to ``path``; rename it into place on success.

    An existing ``path`` is refused unless ``force``; on any error (or Ctrl-C) the
    temporary file is removed and ``path`` is left as it was. The file gets the mode the
    umask gives new files, as any other program's output would.
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
    os.chmod(tmp, _file_mode())  # mkstemp's 0600 would hide the output from colleagues
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
