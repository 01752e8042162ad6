"""Writing converted models: TorchScript (.pt), torch.export (.pt2) and ONNX (.onnx).

Every format keeps the batch, height and width free, so the written model runs at any
input size at least as large as the classifier's window, without nofc installed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ._fx import NodeFailure, param_like, probe
from .errors import NofcError, check_input_size, first_line, refuse_overwrite
from .io import atomic_output
from .receptive import cached_geometry

__all__ = ["save_model", "save_onnx", "to_torchscript", "export_program", "export_onnx",
           "FORMATS"]

FORMATS = {".pt": "TorchScript", ".pt2": "torch.export", ".onnx": "ONNX"}

_INPUT_DIMS = ("batch", "height", "width")


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings and progress lines (they print to stdout)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class InsideWindows(nn.Module):
    """The converted network with its map cut to the windows wholly inside the image,
    ``(H - window_h) // stride_h + 1`` rows (``Geometry.output_shape``): what every
    written format computes, so that a map from a written model is nofc's map.

    >>> import torch, torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.resnet18(), input_size=(3, 64, 64))
    >>> x = torch.randn(1, 3, 110, 64)
    >>> fcn(x).shape[2:], InsideWindows.of(fcn, (3, 64, 64))(x).shape[2:]
    (torch.Size([3, 1]), torch.Size([2, 1]))
    """

    def __init__(self, fcn: nn.Module, window: tuple[int, int], stride: tuple[int, int]):
        super().__init__()
        self.fcn = fcn
        self.window_h, self.window_w = int(window[0]), int(window[1])
        self.stride_h, self.stride_w = int(stride[0]), int(stride[1])

    @classmethod
    def of(cls, fcn: nn.Module, input_size) -> "InsideWindows":
        """``fcn`` wrapped with its geometry's window and stride."""
        geo = cached_geometry(fcn, check_input_size(input_size))
        return cls(fcn, geo.window, geo.stride).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fcn(x)
        h = (x.shape[2] - self.window_h) // self.stride_h + 1
        w = (x.shape[3] - self.window_w) // self.stride_w + 1
        return y[:, :, :h, :w]


def _example_input(fcn: nn.Module, input_size) -> torch.Tensor:
    """A (2, C, 2H, 2W) example: no dimension is 1, so torch.export keeps them all free.

    At the reference size the map is 1 x 1 and torch.export would specialise H and W. A
    network that runs only on the window plus a multiple of its stride (NASNet's fixed
    "same" padding, DLA) gets such a size, 2 strides larger: the exporters then write
    height and width as ``stride * k + window`` (free ``k``).
    """
    c, h, w = check_input_size(input_size)
    device, dtype = param_like(fcn)
    hw = _size_that_runs(fcn, (c, h, w), (2 * h, 2 * w), strides=(2, 2)) or (2 * h, 2 * w)
    return torch.randn(2, c, *hw, device=device, dtype=dtype)


def _size_that_runs(fcn: nn.Module, size, hw, *, strides):
    """``hw`` where ``fcn`` runs on it (or cannot be probed: not an fx graph); for a
    network that runs only on window + k x stride, the window plus ``strides`` strides;
    None when neither."""
    if not isinstance(fcn, fx.GraphModule):
        return hw
    try:
        probe(fcn, (1, size[0], *hw))
        return hw
    except NodeFailure:
        pass
    try:
        geo = cached_geometry(fcn, size)
    except NofcError:  # the exporter's own error says more
        return None
    if not geo.lattice:
        return None
    return (geo.window[0] + strides[0] * geo.stride[0],
            geo.window[1] + strides[1] * geo.stride[1])


def _dynamic_shapes():
    auto = torch.export.Dim.AUTO
    return ({0: auto, 2: auto, 3: auto},)


def _size_oblivious():
    """Keep torch.export from assuming that no size is 1.

    Without this, a program exported at 2H x 2W carries a guard such as
    ``(W - 1) // 32 != 1`` and refuses the reference size itself (a 1 x 1 map).
    """
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - older or newer torch without the switch
        return contextlib.nullcontext()
    if not hasattr(_config, "backed_size_oblivious"):  # pragma: no cover
        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True)


def to_torchscript(fcn: nn.Module, *, input_size=None) -> torch.jit.ScriptModule:
    """Script the converted model; the result runs at any input size >= the window and
    gives one cell per window inside the image (``InsideWindows``; the window is the
    ``input_size`` nofc converted for, or ``input_size`` for a module nofc did not
    convert; without either, the network's own map).

    >>> import torch, torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.resnet18(), input_size=(3, 64, 64))
    >>> to_torchscript(fcn)(torch.randn(1, 3, 96, 110)).shape
    torch.Size([1, 1000, 2, 2])
    """
    size = input_size if input_size is not None else getattr(fcn, "_nofc_input_size", None)
    module = fcn.eval() if size is None else InsideWindows.of(fcn, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(module)
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"TorchScript cannot compile the converted model: "
                            f"{first_line(exc)}") from None


def export_program(fcn: nn.Module, path=None, *, input_size, force: bool = False):
    """torch.export the converted model with free batch, height and width.

    The example input is twice the reference size (see ``_example_input``). With
    ``path`` the program is written there (``torch.export.save``, a ``.pt2`` file) and
    loads with ``torch.export.load(path).module()`` without nofc.

    >>> import torch, nofc
    >>> from nofc.zoo import LeNet5
    >>> fcn = nofc.convert(LeNet5(), input_size=(1, 32, 32))
    >>> ep = export_program(fcn, input_size=(1, 32, 32))
    >>> ep.module()(torch.randn(3, 1, 40, 36)).shape
    torch.Size([3, 10, 3, 2])
    """
    x = _example_input(fcn, input_size)
    module = InsideWindows.of(fcn, input_size)
    try:
        with _quiet(), _size_oblivious():
            ep = torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes())
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"torch.export cannot export the converted model: "
                        f"{first_line(exc)}") from None
    shape = next(n for n in ep.graph.nodes if n.op == "placeholder"
                 and n.name not in ep.graph_signature.inputs_to_parameters
                 and n.name not in ep.graph_signature.inputs_to_buffers).meta["val"].shape
    fixed = [name for name, d in zip(_INPUT_DIMS, (shape[0], shape[2], shape[3]))
             if isinstance(d, int)]
    if fixed:
        raise NofcError(f"torch.export fixed the input's {', '.join(fixed)}; the exported "
                        "model would only run at one size")
    if path is not None:
        with atomic_output(path, force=force) as tmp:
            torch.export.save(ep, tmp)
    return ep


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of an exporter's error (its own first line is a banner)."""
    while exc.__cause__ is not None and str(exc.__cause__).strip():
        exc = exc.__cause__
    return exc


def _name_dims(model_proto) -> None:
    """Rename the exporter's symbols (s0, s77, ...) to batch/height/width everywhere."""
    inp = model_proto.graph.input[0].type.tensor_type.shape.dim
    names = {}
    for i, label in zip((0, 2, 3), _INPUT_DIMS):
        if inp[i].dim_param:
            names[inp[i].dim_param] = label
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    g = model_proto.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)


def export_onnx(fcn: nn.Module, path=None, *, input_size, opset: int | None = None,
                force: bool = False):
    """Export the converted model to ONNX with dynamic batch, height and width.

    Uses torch's dynamo exporter (needs ``onnxscript``); the graph's input is named
    ``input`` with dims ``batch x C x height x width`` and its output ``logits``. The
    model is then run in onnxruntime at the reference size and at another one, against
    the converted network, and refused when it does not run or differs there.
    Returns the ``onnx.ModelProto``; with ``path`` it is also written there (atomically).

    >>> import nofc
    >>> from nofc.zoo import LeNet5
    >>> fcn = nofc.convert(LeNet5(), input_size=(1, 32, 32))
    >>> proto = export_onnx(fcn, input_size=(1, 32, 32))
    >>> [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    ['batch', 1, 'height', 'width']
    """
    try:
        import onnx
    except ImportError:
        raise NofcError("ONNX export needs the onnx extra: pip install 'nofc[onnx]'") from None
    x = _example_input(fcn, input_size)
    module = InsideWindows.of(fcn, input_size)
    kwargs = {} if opset is None else {"opset_version": int(opset)}
    names = {"input_names": ["input"], "output_names": ["logits"], "verbose": False}
    try:
        with _quiet():
            program = torch.onnx.export(module, (x,), dynamo=True,
                                        dynamic_shapes=_dynamic_shapes(), **names, **kwargs)
    except Exception as exc:  # noqa: BLE001
        # the exporter's own symbolic shapes can fail where torch.export's succeed (DLA's
        # stride-2 branches: "Eq(x/8 - ((x/4)//2), 0) cannot be solved"): export first
        try:
            with _quiet(), _size_oblivious():
                ep = torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes())
                program = torch.onnx.export(ep, (x,), dynamo=True, **names, **kwargs)
        except Exception:  # noqa: BLE001 - the first failure says more
            raise NofcError(f"ONNX export of the converted model failed: "
                            f"{first_line(_root_cause(exc))}") from None
    proto = program.model_proto
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = [name for name, i in zip(_INPUT_DIMS, (0, 2, 3)) if not dims[i].dim_param]
    if fixed:
        raise NofcError(f"the ONNX exporter fixed the input's {', '.join(fixed)}; the "
                        "exported model would only run at one size")
    _name_dims(proto)
    if not _large(proto):  # a larger one is checked as written, weights beside it
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"the exported ONNX model fails onnx.checker: "
                            f"{first_line(exc)}") from None
    _check_in_onnxruntime(proto, fcn, x, input_size, reference=module)
    if path is not None:
        save_onnx(proto, path, force=force)
    return proto


def _check_in_onnxruntime(proto, fcn: nn.Module, example: torch.Tensor, input_size, *,
                          reference: nn.Module | None = None) -> None:
    """Run the exported model in onnxruntime (where installed) at the reference size and
    at a size other than the example's, batch 1, against ``reference`` (the module that
    was exported: the converted network ``fcn`` cut to the windows inside).

    onnx.checker does not see a Reshape or Gather that an exporter sized for the example
    input (timm's sequencer2d_s LSTMs: "requested shape {1,36,38,0}"); such a model is
    refused here, before anything is written. Over 2 GiB (no session from memory) the
    check is left to the caller.
    """
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - part of the onnx extra
        return
    if _large(proto):
        return
    c, h, w = check_input_size(input_size)
    device, dtype = param_like(fcn)
    sizes = [(h, w)]
    other = _size_that_runs(fcn, (c, h, w), (2 * h, 3 * w), strides=(1, 3))
    if other is not None and other != tuple(example.shape[-2:]):
        sizes.append(other)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # its own error lines on stderr: ours is the one line
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for hw in sizes:
        x = torch.randn(1, c, *hw, generator=gen).to(dtype)
        try:
            got = sess.run(None, {"input": x.numpy()})[0]
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"the exported ONNX model does not run in onnxruntime at "
                            f"{hw[0]}x{hw[1]} ({_ort_reason(exc)}): the exporter sized an op "
                            "for its example input; nothing was written") from None
        with torch.no_grad():
            want = (reference or fcn)(x.to(device)).cpu().numpy()
        scale = max(float(abs(want).max()), 1e-30)
        err = float(abs(got - want).max()) / scale if got.shape == want.shape else float("inf")
        if err > 1e-4:
            raise NofcError(f"the exported ONNX model gives other outputs than the converted "
                            f"network at {hw[0]}x{hw[1]} (shape {tuple(got.shape)}, max error "
                            f"{err:.1e} of the largest output); nothing was written")


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's error without its source path and C++ signature.

    >>> _ort_reason(RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code "
    ...     "returned while running Reshape node. Name:'r' Status Message: /src/reshape.h:91 "
    ...     "ns::Helper::Helper(const ns::Shape&, bool) Input shape:{36}, requested shape:{0}"))
    "Reshape node 'r': Input shape:{36}, requested shape:{0}"
    """
    msg = first_line(exc)
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", msg)
    if node is None or "Status Message: " not in msg:
        return msg
    status = msg.split("Status Message: ", 1)[1]
    status = re.sub(r"^\S+\.(?:h|cc|cpp):\d+\s+", "", status)  # the source file
    status = re.sub(r"^[\w:~<>]+\([^)]*\)\s*", "", status)  # the C++ function
    return f"{node.group(1)} node '{node.group(2)}': {status}"


def _large(proto) -> bool:
    """Past protobuf's 2 GiB limit (where ``ByteSize`` itself fails: regnet_y_128gf)."""
    try:
        return proto.ByteSize() >= 2**31
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError
        return True


def save_onnx(proto, path, *, force: bool = False) -> None:
    """Write an ``onnx.ModelProto`` atomically; over 2 GiB the weights go to PATH.data.

    The large case is staged in a temporary folder beside PATH (checked there by
    ``onnx.checker``, which cannot hold it whole), then both files are moved into place:
    a failure leaves neither, and an existing PATH.data is refused like PATH. ``proto``
    keeps its weights inside (``onnx.save_model`` moves them out in place; they are read
    back).
    """
    import onnx

    if not _large(proto):
        with atomic_output(path, force=force) as tmp:
            onnx.save_model(proto, tmp)
        return
    from onnx.external_data_helper import load_external_data_for_model

    target = Path(path)
    data = target.with_name(target.name + ".data")
    refuse_overwrite(data, force=force)
    with atomic_output(path, force=force) as tmp, tempfile.TemporaryDirectory(
            dir=target.parent if str(target.parent) else ".", prefix=f".{target.stem}.") as stage:
        staged = Path(stage) / target.name
        onnx.save_model(proto, staged, save_as_external_data=True, location=data.name)
        load_external_data_for_model(proto, stage)  # the caller's proto, whole again
        try:
            onnx.checker.check_model(str(staged))
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"the exported ONNX model fails onnx.checker: "
                            f"{first_line(exc)}") from None
        os.replace(Path(stage) / data.name, data)
        os.replace(staged, tmp)  # atomic_output renames it to PATH


def save_model(fcn: nn.Module, path, *, input_size, force: bool = False) -> str:
    """Write ``fcn`` to ``path`` by its suffix (.pt, .pt2, .onnx); returns the format's name.

    >>> import tempfile, os, nofc
    >>> from nofc.zoo import LeNet5
    >>> fcn = nofc.convert(LeNet5(), input_size=(1, 32, 32))
    >>> save_model(fcn, os.path.join(tempfile.mkdtemp(), "lenet.pt2"), input_size=(1, 32, 32))
    'torch.export'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise NofcError(f"unknown output format {suffix!r} for {path}: use .pt (TorchScript), "
                        ".pt2 (torch.export) or .onnx (ONNX)")
    if suffix == ".pt":
        scripted = to_torchscript(fcn, input_size=input_size)
        with atomic_output(path, force=force) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(scripted, tmp)
    elif suffix == ".pt2":
        refuse_overwrite(path, force=force)
        export_program(fcn, path, input_size=input_size, force=force)
    else:
        refuse_overwrite(path, force=force)
        export_onnx(fcn, path, input_size=input_size, force=force)
    return FORMATS[suffix]
