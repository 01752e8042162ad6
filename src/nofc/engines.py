"""Engines: the converted network's one pass run in onnxruntime or OpenVINO (``engine=``).

``dense_predict(..., engine="onnxruntime")`` (or ``"openvino"``) runs the same converted
network, exported once to ONNX with free height and width (``nofc.export_onnx``: the map
cut to the windows inside the image), in that engine on the CPU, with as many threads as
torch has (``torch.get_num_threads()``). The map is the PyTorch network's to float32
tolerance: the engine is checked against the PyTorch network on a small image before its
first use, and refused in one line where it differs. Its geometry is the PyTorch network's
(``nofc.geometry``), never read from the graph. The engine's network is kept on the
PyTorch network, per input size and engine, until its weights change; it pickles (the
graph as bytes, the engine's session made again where it is unpickled).

Measured on a 2-core CPU (``benchmarks/bench_engines.py``, docs/benchmarks.md): onnxruntime
and OpenVINO ran the float32 pass faster than PyTorch eager. ``precision="bf16"`` with
``engine="openvino"`` runs OpenVINO's bfloat16 pass (``INFERENCE_PRECISION_HINT``
``bf16``: the matrix products in bfloat16, float32 in and out), checked against the PyTorch
network to bfloat16's tolerance (``LOW_TOLERANCE``); onnxruntime's int8 is not offered
(its map moved 2e-2 to 3e-2 of the largest score, and it was no faster).

``"torch"`` (the default) is the network itself. An engine runs float32 on the CPU, the
one pass at the network's stride or shift-and-stitch; a dilated pass (a step finer than
the stride with ``method="dilate"``), a low ``precision`` other than OpenVINO's bf16,
another ``dtype`` or device, and networks nofc did not convert (crop by crop, ONNX
models) are refused in one line.

>>> import torch, nofc
>>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
>>> x = torch.randn(1, 1, 64, 48)
>>> a = nofc.dense_predict(fcn, x, (1, 32, 32))
>>> b = nofc.dense_predict(fcn, x, (1, 32, 32), engine="onnxruntime")
>>> b.shape, bool((a - b).abs().max() <= 1e-4 * a.abs().max())
(torch.Size([1, 10, 9, 5]), True)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ._fx import param_stamp
from .errors import NofcError, first_line
from .export import export_onnx
from .receptive import cached_geometry
from .tolerance import passes, tolerance_for

__all__ = ["ENGINES", "EngineNet", "on_engine", "engine_precision", "LOW_TOLERANCE"]

ENGINES = ("torch", "onnxruntime", "openvino")
_EXTRAS = {"onnxruntime": "onnx", "openvino": "engines"}
# the engine's bfloat16 map against PyTorch's float32 one, at its first use: bfloat16 keeps
# 8 bits of mantissa; measured 5e-3 to 9e-3 of the largest score (resnet18/50, densenet121)
LOW_TOLERANCE = ("rel", 5e-2)


def on_engine(net: nn.Module, input_size, engine: str, *, fine: bool = False,
              low=None, device=None, dtype=None) -> nn.Module:
    """The network ``dense_predict`` runs for ``engine``: ``net`` itself for ``"torch"``,
    else its :class:`EngineNet` (made, checked and kept on ``net`` at first use).
    ``low``: the pass's ``nofc.precision.LowPrecision`` (None: float32).

    Raises:
        NofcError: an unknown engine, one that is not installed (naming the pip extra),
            a pass it does not run (dilated, low precision, not float32, not on the CPU,
            a network nofc did not convert), or an engine whose map differs from the
            PyTorch network's.

    >>> on_engine(torch.nn.Identity(), (1, 8, 8), "torch")
    Identity()
    >>> on_engine(torch.nn.Identity(), (1, 8, 8), "tvm")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: engine must be one of 'torch', 'onnxruntime', 'openvino', got 'tvm'
    """
    if engine not in ENGINES:
        raise NofcError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got "
                        f"{engine!r}")
    if engine == "torch":
        return net
    why = _refusal(net, engine, fine, low, device, dtype)
    if why:
        raise NofcError(f"engine={engine!r} runs the float32 pass of a converted PyTorch "
                        f"network on the CPU; {why}: use engine='torch'")
    _import(engine)
    size = tuple(int(v) for v in input_size)
    entry = net.__dict__.get("_nofc_engine_cache", {}).get(size)
    if entry is None or entry[0] != param_stamp(net):
        graph = _graph(net, size)  # one export for every engine
        # the cache set after it: the exporter puts the module's attributes back as
        # they were before it, a cache made before included
        entry = (param_stamp(net), graph, {})
        net.__dict__.setdefault("_nofc_engine_cache", {})[size] = entry
    made = entry[2]
    precision = "fp32" if low is None else "bf16"
    if (engine, precision) not in made:
        run = EngineNet(entry[1], engine, size, cached_geometry(net, size),
                        precision=precision)
        _check(run, net, size)
        made[engine, precision] = run
    return made[engine, precision]


def engine_precision(engine: str, precision: str) -> str:
    """The precision a pass on ``engine`` asks for: ``"auto"`` means float32 on an engine
    without a bfloat16 pass (onnxruntime here), so that ``"auto"`` is never refused; any
    other precision is the caller's.

    >>> engine_precision("onnxruntime", "auto"), engine_precision("openvino", "auto")
    ('fp32', 'auto')
    """
    return "fp32" if precision == "auto" and engine == "onnxruntime" else precision


def _refusal(net, engine, fine, low, device, dtype) -> str | None:
    if callable(getattr(net, "geometry_for", None)):
        return f"{type(net).__name__} is not one (it states its own geometry)"
    if fine:
        return "a step finer than the stride runs the dilated network (method='shift' runs it)"
    if low is not None and (engine != "openvino" or low.dtype != torch.bfloat16):
        return (f"{str(low.dtype).split('.')[-1]} is not float32 (of the engines, only "
                "engine='openvino' runs precision='bf16')")
    if dtype is not None and dtype != torch.float32:
        return f"dtype={dtype} is not float32"
    params = [p for p in net.parameters() if p.is_floating_point()]
    if params and (params[0].dtype != torch.float32 or params[0].device.type != "cpu"):
        return f"the network is {params[0].dtype} on {params[0].device}"
    if device is not None and torch.device(device).type != "cpu":
        return f"device={str(device)!r} is not the CPU"
    return None


def _import(engine: str):
    try:
        return __import__("onnxruntime" if engine == "onnxruntime" else "openvino")
    except ImportError:
        raise NofcError(f"engine={engine!r} needs {engine}: pip install "
                        f"'nofc[{_EXTRAS[engine]}]'") from None


def _graph(net: nn.Module, size) -> bytes:
    """The converted network as ONNX bytes (export_onnx checks it in onnxruntime)."""
    proto = export_onnx(net, input_size=size)
    try:
        return proto.SerializeToString()
    except Exception:  # noqa: BLE001 - protobuf's 2 GiB limit
        raise NofcError("the converted network's ONNX graph is over 2 GiB, more than an "
                        "engine takes from memory: use engine='torch'") from None


def _check(made: "EngineNet", net: nn.Module, size) -> None:
    """The engine's map against the PyTorch network's on a small image (window + 2 and 3
    strides, on any lattice), to float32 tolerance."""
    geo = made.geometry_for(size)
    hw = (size[1] + 2 * geo.stride[0], size[2] + 3 * geo.stride[1])
    x = torch.randn(1, size[0], *hw, generator=torch.Generator().manual_seed(0))
    h, w = geo.output_shape(hw)
    with torch.no_grad():
        want = net(x)[..., :h, :w]
        got = made(x)
    scale = float(want.abs().max())
    err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    tol = tolerance_for(torch.float32) if made.precision == "fp32" else LOW_TOLERANCE
    if not passes(*tol, err, scale):
        raise NofcError(f"engine {made.engine!r} ({made.precision}) gives other scores than "
                        f"the PyTorch network "
                        f"on a {hw[0]}x{hw[1]} image (shape {tuple(got.shape)}, max error "
                        f"{err:.1e} of the largest score {scale:.1e}): use engine='torch'")


class EngineNet(nn.Module):
    """A converted network's ONNX graph run in ``engine`` on the CPU: ``(B, C, H, W)``
    float32 in, the map of the windows inside the image out; its geometry is the PyTorch
    network's (:meth:`geometry_for`).

    Args:
        graph: the ONNX graph (bytes) ``nofc.export_onnx`` wrote for the network.
        engine: ``"onnxruntime"`` or ``"openvino"``.
        input_size: the ``(C, H, W)`` it was converted for; ``geometry``: its geometry.
        precision: ``"fp32"``, or ``"bf16"`` (OpenVINO's bfloat16 pass).
    """

    def __init__(self, graph: bytes, engine: str, input_size, geometry, *,
                 precision: str = "fp32"):
        super().__init__()
        self.graph, self.engine, self.precision = graph, engine, precision
        self.input_size = tuple(input_size)
        self.geometry = geometry
        self._runner = None  # (threads, function), made at first use

    def geometry_for(self, input_size):
        """The PyTorch network's geometry (the only size this graph was made for)."""
        if tuple(input_size) != self.input_size:
            raise NofcError(f"internal: the {self.engine} network was made for input_size "
                            f"{self.input_size}, not {tuple(input_size)}")
        return self.geometry

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_runner"] = None  # made again where the module arrives (a Dask worker)
        return state

    def extra_repr(self) -> str:
        return (f"engine={self.engine!r}, precision={self.precision!r}, "
                f"input_size={self.input_size}")

    def _run(self, arr: np.ndarray) -> np.ndarray:
        threads = torch.get_num_threads()
        if self._runner is None or self._runner[0] != threads:
            self._runner = (threads, _RUNNERS[self.engine](self.graph, threads,
                                                             self.precision))
        return self._runner[1](arr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise NofcError(f"the {self.engine} network takes float32 on the CPU, not "
                            f"{x.dtype} on {x.device}")
        try:
            out = self._run(np.ascontiguousarray(x.detach().numpy()))
        except NofcError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine's own error, in one line
            raise NofcError(f"the {self.engine} network failed on a "
                            f"{'x'.join(map(str, x.shape))} input: {first_line(exc)}") from None
        return torch.from_numpy(np.ascontiguousarray(out))


def _onnxruntime(graph: bytes, threads: int, precision: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})[0]


def _openvino(graph: bytes, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(graph), "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


_RUNNERS = {"onnxruntime": _onnxruntime, "openvino": _openvino}
