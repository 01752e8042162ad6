"""Precision: the fast mixed-precision modes of a dense pass (``precision=``).

The one rule for the two precision options of ``dense_predict`` and ``tiled_predict``:

* ``dtype`` is the precision the network is *stored and computed* in, exactly: float32 by
  default, float64 for exactness checks. Every operation runs in it.
* ``precision`` is the *fast* mode: ``"fp32"`` (default) computes in ``dtype``;
  ``"bf16"`` and ``"fp16"`` run the matrix products (convolutions, the converted fc
  layers) in bfloat16 or float16 on the hardware's matrix units, which accumulate in
  float32, and the scores come back as float32. ``"auto"`` is ``"bf16"`` where the
  hardware has bfloat16 matrix units (CUDA with bfloat16; a CPU with AMX-BF16 or
  AVX512-BF16) and ``"fp32"`` elsewhere, and says which, once.

A low precision needs ``dtype`` float32 (or unset): a float64 check in bfloat16 would mean
nothing. On a CPU the pass runs a copy of the network in bfloat16 and channels-last (the
layout oneDNN's bfloat16 convolutions want, measured never slower than contiguous:
``nofc.layout``), BatchNorm folded into the convolutions and
the last layer in float32, made once per network and kept on it until its weights change;
measured faster than ``torch.autocast`` around the float32 network, which casts every
weight on every call. On CUDA it runs under ``torch.autocast``. A CPU
without float16 matrix units refuses ``"fp16"`` (it would run about 100x slower than
float32).

>>> import torch, nofc
>>> low_precision("fp32", torch.device("cpu"), None) is None
True
>>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
>>> nofc.dense_predict(fcn, torch.randn(1, 64, 48), (1, 32, 32), precision="bf16").dtype
torch.float32
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.optimization import fuse

from ._fx import output_node, param_stamp
from .errors import NofcError
from .layers import FullConv2d
from .layout import known_format

__all__ = ["PRECISIONS", "LowPrecision", "low_precision", "has_bf16_units", "agreement"]

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NOTED: set = set()  # (device type, choice) pairs "auto" has said once


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((s for s in text.splitlines() if s.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def has_bf16_units(device: torch.device) -> bool:
    """Whether ``device`` has bfloat16 matrix units: CUDA that supports bfloat16, a CPU
    with AMX-BF16 or AVX512-BF16 that oneDNN uses.

    >>> isinstance(has_bf16_units(torch.device("cpu")), bool)
    True
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return (bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
            or "AMX" in torch.backends.cpu.get_cpu_capability())


def _has_fp16_units(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(_cpu_flags() & {"amx_fp16", "avx512_fp16"})


@dataclass(frozen=True)
class LowPrecision:
    """How one pass runs in ``dtype`` (bfloat16 or float16) on ``device``."""

    dtype: torch.dtype
    device: torch.device

    @property
    def autocast(self) -> bool:
        """True: the float32 network under ``torch.autocast``; False: a low copy of it."""
        return self.device.type != "cpu"

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast else self.dtype

    def network(self, net: nn.Module) -> nn.Module:
        """The network to run: ``net`` itself under autocast, else its copy in ``dtype``
        and channels-last, kept on ``net`` until its parameters change."""
        if self.autocast:
            return net
        if callable(getattr(net, "geometry_for", None)) and not any(
                True for _ in net.parameters()):
            raise NofcError(f"precision {_NAMES[self.dtype]!r} runs PyTorch networks; "
                            f"{type(net).__name__} has no PyTorch weights to run in it "
                            "(an ONNX model runs in onnxruntime): use precision='fp32'")
        cache = net.__dict__.setdefault("_nofc_low_cache", {})
        fmt = known_format(self.device, self.dtype)
        key = (self.dtype, self.device, fmt)
        stamp = param_stamp(net)
        if key not in cache or cache[key][0] != stamp:
            cache[key] = (stamp, _low_copy(net, self.dtype, self.device, fmt))
        return cache[key][1]

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the network takes it (the low dtype, channels-last, on a CPU)."""
        x = x.to(device=self.device, dtype=self.input_dtype)
        if not self.autocast and x.dim() == 4:
            x = x.contiguous(memory_format=known_format(self.device, self.dtype))
        return x

    def context(self):
        """Around the pass: autocast on an accelerator, nothing on a CPU."""
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()


_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _low_copy(net: nn.Module, dtype: torch.dtype, device: torch.device,
              fmt: torch.memory_format) -> nn.Module:
    """``net`` in ``dtype`` and layout ``fmt`` (channels-last: ``nofc.layout``), its
    BatchNorms folded into the convolutions before them (in float32: one rounding, and one
    pass over the map less), and the layer that gives the scores kept in float32 on an
    upcast input: the scores are not rounded to bfloat16's 8 bits."""
    low = copy.deepcopy(net).eval()
    # what conversion and dilation recorded on the network (a GraphModule's deepcopy and
    # fuse drop it; the geometry reads it), not what was cached on it
    kept = {k: v for k, v in net.__dict__.items()
            if k.startswith("_nofc_") and not k.endswith(("_cache", "_warned"))}
    for k in [k for k in low.__dict__ if k.startswith("_nofc_")]:
        del low.__dict__[k]
    if isinstance(low, fx.GraphModule):
        low = fuse(low, inplace=True, no_trace=True)  # a new GraphModule
        _fuse_relu(low)
    low.__dict__.update(kept)
    head = _head(low)
    low = low.to(device=device, dtype=dtype, memory_format=fmt)
    for m in low.modules():
        if isinstance(m, FullConv2d):  # its unfold + matmul reads the weight as (O, C*kh*kw)
            m.weight = nn.Parameter(m.weight.detach().contiguous(), requires_grad=False)
    if head is not None:
        head.float()
        head.register_forward_pre_hook(_float32_input)
    return low


class ConvReLU(nn.Conv2d):
    """A convolution and the ReLU after it, as one oneDNN call on a CPU (a bfloat16 ReLU
    on its own is a pass over the map that costs a sixth of resnet50's time).

    >>> conv = ConvReLU(2, 3, 3)
    >>> bool((conv(torch.randn(1, 2, 5, 5)) >= 0).all())
    True
    """

    def forward(self, x):
        if (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, list(self.padding), list(self.stride),
                list(self.dilation), self.groups, "relu", [], "")
        return torch.relu(super().forward(x))


_RELUS = {torch.relu, torch.relu_, torch.nn.functional.relu}


def _fuse_relu(gm: fx.GraphModule) -> None:
    """Every plain ``nn.Conv2d`` whose only user is a ReLU becomes a :class:`ConvReLU`, and
    the ReLU leaves the graph (its node's users read the convolution's)."""
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or len(n.users) != 1:
            continue
        conv = gm.get_submodule(n.target)
        relu = next(iter(n.users))
        if type(conv) is not nn.Conv2d or relu.args[:1] != (n,) or not (
                (relu.op == "call_module"
                 and isinstance(gm.get_submodule(relu.target), nn.ReLU))
                or (relu.op == "call_function" and relu.target in _RELUS)
                or (relu.op == "call_method" and relu.target in ("relu", "relu_"))):
            continue
        conv.__class__ = ConvReLU
        relu.replace_all_uses_with(n)
        gm.graph.erase_node(relu)
    gm.recompile()


def _head(gm: nn.Module) -> nn.Module | None:
    """The convolution whose output the network returns, if it is one."""
    if not isinstance(gm, fx.GraphModule):
        return None
    out = output_node(gm)
    if isinstance(out, fx.Node) and out.op == "call_module":
        m = gm.get_submodule(out.target)
        if isinstance(m, nn.Conv2d):
            return m
    return None


def _float32_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)


def low_precision(precision: str, device: torch.device, dtype: torch.dtype | None
                  ) -> LowPrecision | None:
    """The low precision a pass runs in, or None for ``dtype`` itself (``"fp32"``).

    Raises:
        NofcError: an unknown precision, a low one with ``dtype`` other than float32, or
            ``"fp16"`` on a CPU without float16 matrix units.

    >>> low_precision("bf16", torch.device("cpu"), None)
    LowPrecision(dtype=torch.bfloat16, device=device(type='cpu'))
    >>> low_precision("fp8", torch.device("cpu"), None)
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: precision must be one of 'fp32', 'bf16', 'fp16', 'auto', got 'fp8'
    """
    if precision not in PRECISIONS:
        raise NofcError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got "
                        f"{precision!r}")
    if precision == "fp32":
        return None
    if dtype is not None and dtype != torch.float32:
        raise NofcError(f"precision={precision!r} runs a float32 network faster in low "
                        f"precision; dtype={dtype} asks for every operation in {dtype}: give "
                        "one or the other")
    if precision == "auto":
        precision = "bf16" if has_bf16_units(device) else "fp32"
        if (device.type, precision) not in _NOTED:
            _NOTED.add((device.type, precision))
            why = ("it has bfloat16 matrix units" if precision == "bf16"
                   else "no bfloat16 matrix units found")
            warnings.warn(f"nofc: precision 'auto' runs {precision} on {device.type}: {why}",
                          stacklevel=3)
        if precision == "fp32":
            return None
    if precision == "fp16" and not _has_fp16_units(device):
        raise NofcError(f"precision='fp16': this {device.type} has no float16 matrix units "
                        "(float16 runs far slower than float32 here); use precision='bf16' "
                        "or 'auto'")
    return LowPrecision(_DTYPES[precision], device)


def agreement(reference: torch.Tensor, scores: torch.Tensor) -> dict:
    """How far a low-precision map is from the float32 one: ``same_top`` (the fraction of
    cells with the same top class) and ``max_prob_diff`` (the largest difference of a
    softmax probability over classes, dim 1 of ``(B, K, h, w)`` maps).

    >>> a = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    >>> agreement(a, a + torch.tensor([0.0, 3.0])[None, :, None, None])["same_top"]
    0.5
    """
    if reference.shape != scores.shape:
        raise NofcError(f"maps of different shapes: {tuple(reference.shape)} and "
                        f"{tuple(scores.shape)}")
    ref, low = reference.double(), scores.double()
    same = (ref.argmax(1) == low.argmax(1)).double().mean()
    diff = (ref.softmax(1) - low.softmax(1)).abs().max()
    return {"same_top": float(same), "max_prob_diff": float(diff)}
