"""Rewrite a classifier so that its fully-connected layers become convolutions.

The rewrite runs on a torch.fx graph of a deep copy of the model, in two steps.
``_plan`` reads the graph and its shapes and decides, changing nothing:

* a Linear that reads a flattened C x H x W volume becomes ``Conv2d(C, out, (H, W))``;
* every later Linear becomes a 1x1 ``Conv2d``; BatchNorm1d becomes BatchNorm2d;
* the flatten (``nn.Flatten``, ``torch.flatten``, ``x.view(x.size(0), -1)``, ...) is removed;
* adaptive pooling that is the identity at the reference size is removed, and global
  pooling becomes the windowed pooling it stands for (or stays global on request).

``_apply`` then makes those edits. Shapes are found by running the graph on fake tensors
(no arithmetic, no memory).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable, NoReturn

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._fx import (
    ANY_STRIDE,
    PROBE_BATCH as _BATCH,
    NodeFailure,
    ShapeRecorder,
    channels_last_pool,
    describe_node,
    drop_dead_code,
    fmt_shape,
    bind,
    global_pool,
    param_like,
    probe,
    remember,
    trace,
    viewed,
    written,
)
from .errors import NofcError, check_input_size, first_line
from .layers import FullConv2d, pair
from .tolerance import passes, tolerance_for

__all__ = ["convert", "convert_with_record"]


# --------------------------------------------------------------------------- op sets

_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Dropout, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Identity,
)
_ELEMENTWISE_FUNCS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.dropout, F.alpha_dropout, F.sigmoid,
    F.tanh, F.logsigmoid, F.threshold, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
    torch.abs, torch.neg, torch.clamp, torch.dropout, torch.nn.functional.relu_,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp",
    "clamp_", "contiguous", "float", "double", "half", "to", "type_as",
}
_BINARY_OPS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.neg, torch.add, torch.sub, torch.mul, torch.div,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}


# --------------------------------------------------------------------------- plan records


@dataclass(frozen=True)
class Options:
    """What :func:`convert` was asked for, checked."""

    input_size: tuple[int, int, int]
    pooling: str = "window"
    fc_stride: int = 1
    flatten_order: str = "chw"


@dataclass(frozen=True)
class Layout:
    """What a node holds: a ``(B, C, H, W)`` map, or (``flat``) that map as ``(B, C*H*W)``.

    ``order`` says how a flattened vector's features run: ``"chw"`` (PyTorch) or ``"hwc"``.
    """

    c: int
    h: int
    w: int
    flat: bool = False
    order: str = "chw"


@dataclass(frozen=True)
class Replacement:
    """One planned edit: the node, what it was, what it becomes, and why.

    ``kind`` is ``"linear_to_conv"``, ``"bn1d_to_bn2d"``, ``"softmax_dim"`` (over the
    channels now), ``"drop"`` (a flatten, identity pooling or same-shape reshape: its readers
    take its input), ``"pool"`` (a new pooling module), ``"squeeze_pair"`` (the first of two
    squeezes of a ``(B, C, 1, 1)`` map; the second is dropped as the flatten) or
    ``"last_dim"`` (a LayerNorm over the features: it runs on the map permuted to
    channels-last and back) or ``"fixed_pad"`` (an ``F.pad`` by amounts computed from the
    input size, TensorFlow's "same", fixed at the amounts of the reference size: ``pad``).
    """

    kind: str
    node: str  # fx node name in the traced graph
    name: str  # module path, or the node name for a function or method: explain's row
    before: str
    after: str
    reason: str
    shown: bool = True  # a row of explain's table (internal squeezes and reshapes are not)
    module: nn.Module | None = None  # pool, softmax module: the new parameter-free module
    layout: Layout | None = None  # linear_to_conv: the flattened vector the Linear reads
    stride: int = 1  # linear_to_conv
    dim_at: int | str | None = None  # softmax_dim of a call: where its dim argument goes
    channels_last: bool = False  # pool: its input is (B, H, W, C), permuted to (B, C, H, W)
    pad: tuple[int, ...] = ()  # fixed_pad: the amounts at the reference size


@dataclass
class Plan:
    """Everything the conversion will do, decided before the graph is touched."""

    options: Options
    layouts: dict[str, Layout] = field(default_factory=dict)  # node name -> what it holds
    replacements: list[Replacement] = field(default_factory=list)  # in graph order
    # pooling inside the body (squeeze-and-excitation) or attention over all positions:
    # kept, map cells see the whole image
    global_context: list[str] = field(default_factory=list)
    context_reasons: dict[str, str] = field(default_factory=dict)  # name -> why, if not pooling

    def context_reason(self, name: str) -> str:
        """Why the kept global node ``name`` sees the whole image, in one phrase."""
        return (self.context_reasons.get(name)
                or f"'{name}' pools over the whole image (squeeze-and-excitation)")

    def __str__(self) -> str:
        lines = [f"{r.kind} {r.name}: {r.before} -> {r.after} ({r.reason})"
                 for r in self.replacements]
        lines += [f"kept global {name}: "
                  + self.context_reasons.get(name, "pooling inside the body")
                  for name in self.global_context]
        return "\n".join(lines) or "nothing to change"


@dataclass
class ConversionRecord:
    """The plan and the shapes around it; kept on the converted module as ``_nofc_record``."""

    plan: Plan
    shapes_before: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    shapes_after: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # function node -> new module node

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.plan.options.input_size

    @property
    def global_context(self) -> list[str]:
        return self.plan.global_context

    @property
    def changes(self) -> list[Replacement]:
        """The rewritten layers, as explain() lists them."""
        return [r for r in self.plan.replacements if r.shown]


# --------------------------------------------------------------------------- convert


def convert(
    model: nn.Module,
    input_size,
    *,
    pooling: str = "window",
    fc_stride: int = 1,
    flatten_order: str = "chw",
) -> fx.GraphModule:
    """Return a fully convolutional copy of ``model`` with the same weights.

    Args:
        model: a trained classifier; it is deep-copied, never modified.
        input_size: ``(C, H, W)`` the classifier was trained on (the reference size).
        pooling: ``"window"`` turns global pooling into a sliding window of the reference
            feature size (each map cell is the classifier on one input window);
            ``"global"`` keeps it global (one vector for any input size).
        fc_stride: stride of the first converted layer (the fc6 stride of the OverFeat/FCN
            papers); larger values give a coarser, cheaper map.
        flatten_order: ``"chw"`` (PyTorch) or ``"hwc"`` for weights trained after a
            channels-last flatten (Keras/TensorFlow).

    Returns:
        A ``torch.fx.GraphModule`` in eval mode whose output is ``(B, K, h, w)``.

    >>> import torch, torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.vgg11(), input_size=(3, 224, 224))
    >>> fcn(torch.randn(1, 3, 288, 288)).shape
    torch.Size([1, 1000, 3, 3])
    """
    fcn, _ = convert_with_record(model, input_size, pooling=pooling, fc_stride=fc_stride,
                                 flatten_order=flatten_order)
    return fcn


def as_fcn(model: nn.Module, size, *, check: bool = True, refused=None) -> nn.Module:
    """``model`` itself when nofc converted it for ``size``; else its conversion, which
    with ``check`` must give the classifier's outputs at ``size`` (``check_conversion``)
    before any map is computed from it. ``refused(error)``, when given, makes the network
    for a classifier that ``convert`` refuses (``nofc.crops``); a failed check is never
    passed to it."""
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    have = getattr(model, "_nofc_input_size", None)
    if have is not None:
        if tuple(have) != tuple(size):
            raise NofcError(f"the network was converted for input_size={tuple(have)}, not "
                            f"{tuple(size)}")
        return model
    try:
        fcn = convert(model, size)
    except NofcError as exc:
        if refused is None:
            raise
        return refused(exc)
    if check:
        check_conversion(model, fcn, size)
    return fcn


def check_conversion(model: nn.Module, fcn: nn.Module, input_size, *, seed: int = 0) -> float:
    """One forward of each at the reference size, on the same random batch of 2, in
    float32 (or float64 for a float64 model), under ``verify``'s tolerance rule; the
    largest error relative to the largest output, or a NofcError naming it.

    >>> import nofc
    >>> m = nofc.zoo.LeNet5()
    >>> check_conversion(m, nofc.convert(m, (1, 32, 32)), (1, 32, 32)) < 1e-5
    True
    """
    size = check_input_size(input_size)
    device, dtype = param_like(model)
    run_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(2, *size, generator=g, dtype=run_dtype).to(device)
    with torch.no_grad():
        want = _eval_forward(model, x, run_dtype).reshape(2, -1)
        got = _eval_forward(fcn, x, run_dtype)
    got = got.reshape(2, -1) if got.numel() == want.numel() else None
    if got is None:
        raise NofcError(f"the converted network does not give the classifier's output at "
                        f"{size[1]}x{size[2]}: {tuple(want.shape)} vs "
                        f"{tuple(_eval_forward(fcn, x, run_dtype).shape)}; nothing was computed")
    diff = (got.double() - want.double()).abs()
    max_abs = float(diff.max()) if bool(torch.isfinite(diff).all()) else float("inf")
    scale = float(want.double().abs().max())
    if not passes(*tolerance_for(run_dtype), max_abs, scale):
        raise NofcError(f"the converted network differs from the classifier at "
                        f"{size[1]}x{size[2]} (max error {max_abs / max(scale, 1e-30):.2e} of "
                        f"the largest output, {str(run_dtype).replace('torch.', '')}): refusing "
                        "to compute a map from it; nofc.explain shows what was changed "
                        "(check=False / --no-check skips this check)")
    return max_abs / max(scale, 1e-30)


def _eval_forward(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``module(x)`` in eval mode and ``dtype``; a copy where either would change it."""
    if module.training or param_like(module)[1] != dtype:
        module = copy.deepcopy(module).to(dtype).eval()
    out = module(x)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def convert_with_record(
    model: nn.Module, input_size, *, pooling: str = "window", fc_stride: int = 1,
    flatten_order: str = "chw",
) -> tuple[fx.GraphModule, ConversionRecord]:
    """:func:`convert`, also returning its :class:`ConversionRecord` (the plan, the shapes).

    >>> from nofc.zoo import LeNet5
    >>> fcn, record = convert_with_record(LeNet5(), (1, 32, 32))
    >>> [r.name for r in record.changes], record.shapes_after["output"]
    (['view', 'f6', 'output'], (2, 10, 1, 1))
    """
    options = _options(model, input_size, pooling, fc_stride, flatten_order)
    # the copy is made outside inference mode, whatever the caller's: tensors made in it
    # could never take part in autograd (fine-tuning, measuring a field by gradients)
    with torch.inference_mode(False):
        return _converted(model, options)


def _converted(model: nn.Module, options: Options) -> tuple[fx.GraphModule, ConversionRecord]:
    gm = trace(copy.deepcopy(model).eval(), options.input_size)
    ref = (_BATCH, *options.input_size)
    before = _probe_or_explain(gm, ref, options.input_size, model_name=type(model).__name__)
    record = ConversionRecord(_plan(gm, before.shapes, options), dict(before.shapes))
    _plan_fixed_pads(gm, before, record.plan)
    record.replaced = _apply(gm, record.plan)
    record.shapes_after, big = _check_converted(
        gm, before, options.input_size,
        lattice=any(r.kind == "fixed_pad" for r in record.plan.replacements))
    for name, why in _global_mixers(gm, record.shapes_after, big).items():
        record.plan.global_context.append(name)
        record.plan.context_reasons[name] = why
    # read by explain() and the geometry; ignored by TorchScript
    remember(gm, _nofc_record=record, _nofc_input_size=options.input_size)
    return gm, record


def _options(model, input_size, pooling, fc_stride, flatten_order) -> Options:
    """The arguments of convert() checked, or a NofcError naming the bad one."""
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = check_input_size(input_size)
    if pooling not in ("window", "global"):
        raise NofcError(f"pooling must be 'window' or 'global', got {pooling!r}")
    if flatten_order not in ("chw", "hwc"):
        raise NofcError(f"flatten_order must be 'chw' or 'hwc', got {flatten_order!r}")
    if not isinstance(fc_stride, int) or isinstance(fc_stride, bool) or fc_stride < 1:
        raise NofcError(f"fc_stride must be a positive integer, got {fc_stride!r}")
    return Options(size, pooling, fc_stride, flatten_order)


def _check_converted(gm: fx.GraphModule, before: ShapeRecorder, size, *,
                     lattice: bool = False) -> tuple[dict, dict]:
    """Same output at the reference size, and it runs larger; return the shapes after, at
    the reference size and at twice it (with fixed "same" padding, at the reference size
    plus a multiple of every usual stride: NASNet's branches meet only there)."""
    ref = (_BATCH, *size)
    try:
        after = probe(gm, ref, dtype=param_like(gm)[1])
    except NodeFailure as f:  # pragma: no cover - a bug in the rewrite, not user input
        raise NofcError(f"internal: converted graph fails at {describe_node(gm, f.node)}: "
                        f"{f.exc}") from None
    _check_outputs(gm, before, after)
    big = ((_BATCH, size[0], size[1] + ANY_STRIDE, size[2] + ANY_STRIDE) if lattice
           else (_BATCH, size[0], 2 * size[1], 2 * size[2]))
    try:
        at_big = probe(gm, big, dtype=param_like(gm)[1])
    except NodeFailure as f:
        raise NofcError(
            f"{describe_node(gm, f.node)} only works at the reference size: on a "
            f"{size[0]}x{big[2]}x{big[3]} input it fails ({first_line(f.exc)}); "
            "it depends on the spatial size, so the model cannot be made fully convolutional"
        ) from None
    return dict(after.shapes), dict(at_big.shapes)


_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.baddbmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}


def _global_mixers(gm: fx.GraphModule, ref: dict, big: dict) -> dict[str, str]:
    """Ops whose output at one position sums over every position of the image: node ->
    why.

    A product that contracts a dimension growing with the input (attention over all
    spatial tokens as in PVT-v2 or CoaT, linear attention, global-context blocks) mixes
    the whole image into each cell; windowed attention (Swin) contracts a fixed number of
    tokens and is not one. Found by comparing the shapes at two input sizes.
    """
    found = {}
    for n in gm.graph.nodes:
        grows = [(a, d) for a, d in _contracted(gm, n)
                 if isinstance(a, fx.Node) and _dim(ref, a, d) != _dim(big, a, d)]
        if grows:
            a, d = grows[0]
            found[n.target if n.op == "call_module" else n.name] = (
                f"{describe_node(gm, n)} sums over {_dim(ref, a, d)} positions at the "
                "reference size, a number that grows with the image (attention over all "
                "positions)")
    return found


def _dim(shapes: dict, a: fx.Node, d: int):
    s = shapes.get(a.name)
    return s[d] if s is not None and -len(s) <= d < len(s) else None


def _contracted(gm: fx.GraphModule, n: fx.Node) -> list[tuple]:
    """(input node, dim) pairs that ``n`` sums over: matmul's inner dim, attention's keys."""
    if (n.op == "call_function" and n.target in _MATMUL_FUNCS
            or n.op == "call_method" and n.target in _MATMUL_METHODS):
        args = n.args[1:] if n.target is torch.baddbmm else n.args
        return [(args[0], -1)] if len(args) >= 2 else []
    if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
        return [(n.args[1], -2)] if len(n.args) >= 2 else []
    if n.op == "call_function" and n.target is torch.einsum and isinstance(n.args[0], str):
        return _einsum_contracted(n.args[0], n.args[1:])
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention):
        key = n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
        first = gm.get_submodule(n.target).batch_first
        return [(key, 1 if first else 0)]
    return []


def _einsum_contracted(eq: str, operands) -> list[tuple]:
    """The (operand, dim) pairs an einsum equation sums over (letters not in the output).

    >>> [d for _, d in _einsum_contracted("bhnd,bhmd->bhnm", ["q", "k"])]
    [3, 3]
    """
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    ins, _, out = eq.replace(" ", "").partition("->")
    pairs = []
    for spec, a in zip(ins.split(","), operands):
        pairs += [(a, i) for i, c in enumerate(spec) if c.isalpha() and c not in out]
    return pairs if "." not in eq else []


def _probe_or_explain(gm, ref, size, model_name) -> ShapeRecorder:
    """Probe at the reference size; a failure becomes a NofcError with a suggestion."""
    try:
        return probe(gm, ref, dtype=param_like(gm)[1])
    except NodeFailure as f:
        msg = first_line(f.exc)
        node = f.node
        detail = ""
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            lin = gm.get_submodule(node.target)
            detail = _linear_mismatch(gm, node, lin, size)
        elif node.op == "call_module" and isinstance(
            gm.get_submodule(node.target), nn.modules.conv._ConvNd
        ):
            conv = gm.get_submodule(node.target)
            detail = (f": it expects {conv.in_channels} input channels"
                      if conv.in_channels != size[0] and node.all_input_nodes
                      and node.all_input_nodes[0].op == "placeholder" else f": {msg}")
        else:
            detail = f": {msg}"
        raise NofcError(
            f"{model_name} does not run on input_size={size}: {describe_node(gm, node)} "
            f"fails{detail}"
        ) from None


def _linear_mismatch(gm, node, lin: nn.Linear, size) -> str:
    """Say what the Linear expected and which square input size would give it."""
    src = node.all_input_nodes[0]
    feat = None
    try:
        rec = probe(gm, (_BATCH, *size), torch.float32, partial=True)
        feat = rec.shapes.get(src.name)
        # the 4D map the vector was flattened from, for the message
        spatial = None
        for cand in [src, *src.all_input_nodes]:
            s = rec.shapes.get(cand.name)
            if s is not None and len(s) == 4:
                spatial = s
                break
    except Exception:  # noqa: BLE001
        spatial = None
    got = "?" if feat is None else str(feat[-1])
    vol = f"the feature map is {'x'.join(map(str, spatial[1:]))} = {got}" if spatial else (
        f"it receives {got}")
    hint = _suggest_size(gm, node, lin.in_features, size)
    hint_txt = f"; pass input_size={hint}?" if hint else ""
    return f": Linear expects {lin.in_features} inputs but {vol}{hint_txt}"


def _suggest_size(gm, node, in_features, size):
    """Smallest square (C, S, S) near the given size at which ``node`` gets in_features."""
    src = node.all_input_nodes[0]

    def feat_at(s):
        rec = probe(gm, (_BATCH, size[0], s, s), torch.float32, partial=True)
        shp = rec.shapes.get(src.name)
        return None if shp is None else shp[-1]

    for s in sorted(range(4, 1025), key=lambda s: abs(s - size[1]))[:600]:
        if feat_at(s) == in_features:
            # several sizes fit when pooling floors; the smallest is the usual training size
            while s > 1 and feat_at(s - 1) == in_features:
                s -= 1
            return (size[0], s, s)
    return None


def _check_outputs(gm: fx.GraphModule, before: ShapeRecorder, after: ShapeRecorder) -> None:
    """The classifier's (B, K) output must have become (B, K, 1, 1) at the reference size."""
    sb, sa = before.shapes.get("output"), after.shapes.get("output")
    if sb is not None and sa is not None and len(sb) == 2:
        if not (len(sa) == 4 and sa[:2] == sb and sa[2:] == (1, 1)):
            out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            origin = _vector_origin(gm, after.shapes, out) if isinstance(out, fx.Node) else ""
            raise NofcError(
                f"cannot convert {type(gm).__name__}: its output {fmt_shape(sb)} does not come "
                f"from a C x H x W feature map{f' ({origin})' if origin else ''}, so it has "
                "no per-window form; nothing was converted")


def _vector_origin(gm: fx.GraphModule, shapes: dict, n: fx.Node) -> str:
    """Where a (B, F) vector comes from, for refusals: the op that made it from a tensor of
    another rank, followed back through ops that keep it a (B, F) vector.

    >>> import torch.nn as nn
    >>> class ClassToken(nn.Module):
    ...     def forward(self, x):
    ...         return x.flatten(2).transpose(1, 2)[:, 0].relu()
    >>> gm = trace(ClassToken())
    >>> out = list(gm.graph.nodes)[-2]
    >>> _vector_origin(gm, probe(gm, (2, 3, 4, 4)).shapes, out)
    "node 'getitem' (function getitem) takes one token of a (2, 16, 3) sequence (a class token)"
    """
    seen = set()
    while n not in seen:
        seen.add(n)
        ins = [a for a in n.all_input_nodes if shapes.get(a.name) is not None]
        if len(ins) != 1 or len(shapes[ins[0].name]) != 2:
            break
        n = ins[0]
    ins = [shapes.get(a.name) for a in n.all_input_nodes]
    s_in = next((s for s in ins if s is not None and len(s) == 3), None)
    label = describe_node(gm, n)
    if s_in is not None and n.op == "call_function" and n.target is operator.getitem:
        return f"{label} takes one token of a {fmt_shape(s_in)} sequence (a class token)"
    if s_in is not None and (n.op == "call_method" and n.target in ("mean", "sum", "amax")
                             or n.target in (torch.mean, torch.sum, torch.amax)):
        return f"{label} pools a {fmt_shape(s_in)} sequence of tokens"
    if n.op in ("placeholder", "get_attr", "output"):
        return ""
    shown = ", ".join(fmt_shape(s) for s in ins if s is not None) or "-"
    return f"{label} makes it from {shown}"


# --------------------------------------------------------------------------- plan


class _Planner:
    """Reads the graph and its shapes (never edits them) and builds the :class:`Plan`."""

    def __init__(self, gm: fx.GraphModule, shapes: dict, options: Options):
        self.gm = gm
        self.shapes = shapes
        self.plan = Plan(options)
        self.swapped: dict[str, Layout] = {}  # module path -> the layout its first call reads
        self.alias: dict[str, fx.Node] = {}  # squeeze planned away -> the map it squeezed
        self.gate: set[fx.Node] = set()  # computed from a pooling inside the body: left alone
        self.stride_used = False

    @property
    def options(self) -> Options:
        return self.plan.options

    def shape(self, n) -> tuple[int, ...] | None:
        return self.shapes.get(n.name) if isinstance(n, fx.Node) else None

    def module(self, n: fx.Node) -> nn.Module:
        return self.gm.get_submodule(n.target)

    def vector(self, n: fx.Node) -> Layout | None:
        """The layout of ``n`` when it is a flattened feature vector."""
        layout = self.plan.layouts.get(n.name)
        return layout if layout is not None and layout.flat else None

    def flat(self, c: int, h: int = 1, w: int = 1) -> Layout:
        return Layout(c, h, w, flat=True, order=self.options.flatten_order)

    def add(self, n: fx.Node, kind: str, before: str, after: str, reason: str, **kw) -> None:
        name = n.target if n.op == "call_module" else n.name
        self.plan.replacements.append(Replacement(kind, n.name, name, before, after, reason,
                                                  **kw))

    def first_call(self, n: fx.Node, layout: Layout) -> bool:
        """True for the first call of module ``n``; a later call (a shared module, already
        planned) must read the same layout."""
        if n.target in self.swapped:
            if self.swapped[n.target] != layout:
                self.fail(n, f"a shared {type(self.module(n)).__name__} reads vectors of "
                             "different layouts")
            return False
        self.swapped[n.target] = layout
        return True

    def next_stride(self) -> int:
        """``fc_stride`` for the first layer that slides over the features, 1 after it."""
        if self.stride_used:
            return 1
        self.stride_used = True
        return self.options.fc_stride

    def fail(self, n: fx.Node, why: str) -> NoReturn:
        ins = [self.shape(a) for a in n.all_input_nodes]
        raise NofcError(
            f"cannot convert {describe_node(self.gm, n)}: {why} "
            f"(input {', '.join(fmt_shape(s) for s in ins) or '-'}, "
            f"output {fmt_shape(self.shape(n))}); nothing was converted"
        )

    def unsupported(self, n: fx.Node) -> NoReturn:
        if n.op == "call_module":
            self.fail(n, f"{type(self.module(n)).__name__} cannot be applied window by window "
                         "to the flattened feature vector")
        self.fail(n, "this op on the flattened feature vector has no per-window equivalent")


def _plan(gm: fx.GraphModule, shapes: dict, options: Options) -> Plan:
    """Decide every edit and each node's layout, changing nothing; refuse what cannot slide.

    >>> from nofc.zoo import LeNet5
    >>> gm = trace(LeNet5())
    >>> plan = _plan(gm, probe(gm, (2, 1, 32, 32)).shapes, Options((1, 32, 32)))
    >>> [(r.kind, r.name) for r in plan.replacements]
    [('drop', 'view'), ('linear_to_conv', 'f6'), ('linear_to_conv', 'output')]
    >>> plan.layouts["view"]
    Layout(c=120, h=1, w=1, flat=True, order='chw')
    """
    p = _Planner(gm, shapes, options)
    for n in gm.graph.nodes:
        s = p.shape(n)
        if s is not None and len(s) == 4:
            p.plan.layouts[n.name] = Layout(*s[1:])
        if n.op in ("placeholder", "get_attr", "output") or n in p.gate or _plan_pool(p, n):
            continue
        vin = [a for a in n.all_input_nodes if p.vector(a) is not None]
        if vin:
            _plan_vector_op(p, n, vin)
        else:
            _check_plain(p, n)
            _plan_flatten(p, n)
    if not p.stride_used and options.fc_stride != 1:
        raise NofcError(
            f"fc_stride={options.fc_stride} has no layer to act on: the model has no "
            "flattened Linear or global pooling"
        )
    return p.plan


_SLIDING_FUNCS = {F.conv2d, torch.conv2d, F.max_pool2d, torch.max_pool2d, F.avg_pool2d,
                  torch._C._nn.avg_pool2d}
_SLIDING_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _plan_fixed_pads(gm: fx.GraphModule, before, plan: Plan) -> None:
    """TensorFlow's "same" padding (timm's ``Conv2dSame``, ``MaxPool2dSame``, ``pad_same``;
    NASNet, PNASNet, the ``tf_`` EfficientNets and MixNets): an ``F.pad`` whose amounts are
    computed from the input size, right before a convolution or pooling.

    On an image of the reference size plus any multiple of the network stride every
    layer's input keeps its size modulo the layer's stride, so the amounts stay those of
    the reference size: fixed at them, the converted network is the original on every such
    image and slides like any padded network on the others (a map cell's window starts on
    a multiple of the stride, as on a crop). Checked at two such sizes; an amount that
    changes there (padding to a multiple of an attention window) is left computed.
    """
    size = plan.options.input_size
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad
            and any(isinstance(a, fx.Node) for a in _pad_amounts(n))
            and n.users and all(_sliding(gm, u) for u in n.users)]
    if not pads:
        return
    probes = [before]
    for k in ((1, 2), (2, 1)):
        hw = (size[1] + k[0] * ANY_STRIDE, size[2] + k[1] * ANY_STRIDE)
        try:
            probes.append(probe(gm, (_BATCH, size[0], *hw), dtype=param_like(gm)[1]))
        except NodeFailure:
            return  # runs at the reference size only: convert's own check says so
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    for n in pads:
        amounts = {tuple(p.values.get(a.name) if isinstance(a, fx.Node) else a
                         for a in _pad_amounts(n)) for p in probes}
        fixed = amounts.pop()
        if amounts or not all(isinstance(a, int) for a in fixed):
            continue
        plan.replacements.append(Replacement(
            "fixed_pad", n.name, n.name, "pad (amounts from the input size)",
            f"pad {fixed}", "TensorFlow 'same' padding: the amounts of the reference size, "
            "which it has on every image of the window plus a multiple of the stride",
            pad=fixed))
    plan.replacements.sort(key=lambda r: order.get(r.node, -1))


def _pad_amounts(n: fx.Node) -> tuple:
    pad = bind(F.pad, n).get("pad", ())
    return tuple(pad) if isinstance(pad, (tuple, list)) else ()


def _sliding(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A convolution or pooling (what TensorFlow's "same" padding comes before)."""
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _SLIDING_MODULES)
    return n.op == "call_function" and n.target in _SLIDING_FUNCS


def _is_reshape(gm: fx.GraphModule, n: fx.Node) -> bool:
    """The one reshape recogniser: flatten / reshape / view / squeeze, as call or module."""
    return (
        (n.op == "call_function" and n.target in _RESHAPE_FUNCS)
        or (n.op == "call_method" and n.target in _RESHAPE_METHODS)
        or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Flatten))
    )


def _by_type(table: dict, cls: type):
    """The entry of ``table`` for ``cls`` or its nearest base class (None if none)."""
    return next((table[k] for k in cls.__mro__ if k in table), None)


# --------------------------------------------------------------------------- plan: pooling


def _plan_pool(p: _Planner, n: fx.Node) -> bool:
    """Plan adaptive or global pooling; True when ``n`` is one (then nothing else applies)."""
    kind = global_pool(p.gm, n)
    last = channels_last_pool(n)
    if last is not None:
        kind = (last, 1)
    if kind is None or kind[0] == "sum" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    gate = _gate(p, n)
    if gate is not None:
        p.plan.global_context.append(n.target if n.op == "call_module" else n.name)
        p.gate |= gate
        return True
    src = n.args[0]
    s_in, s_out = p.shape(src), p.shape(n)
    if s_in is None or s_out is None or len(s_in) != 4:
        return False
    if p.vector(src) is not None:
        p.fail(n, "pooling over a flattened vector")
    if last is not None:  # (B, H, W, C): planned as the (B, C, H, W) map it stands for
        s_in = (s_in[0], s_in[3], s_in[1], s_in[2])
    planned = _plan_pool_rewrite(p, n, kind, s_in, s_out, channels_last=last is not None)
    if planned and len(s_out) == 2:  # x.mean((2, 3)): its readers see a (C, 1, 1) vector
        p.plan.layouts[n.name] = p.flat(s_in[1])
    return True


def _plan_pool_rewrite(p: _Planner, n: fx.Node, kind, s_in, s_out, *,
                       channels_last: bool = False) -> bool:
    """Remove, keep global or window the pooling ``n``; False when it stays as it is."""
    op, out_size = kind
    h, w = s_in[2:]
    oh, ow = pair(out_size, (h, w))
    before = f"{'Adaptive' if n.op == 'call_module' else 'global '}{op}pool -> {oh}x{ow}"
    if channels_last:
        before = f"global {op}pool of (B, H, W, C) over H, W"
    shapes = f"{fmt_shape(s_in)} -> {fmt_shape(s_out)}"
    if p.options.pooling == "global":
        if (oh, ow) != (1, 1):
            return False
        new = nn.AdaptiveAvgPool2d(1) if op == "avg" else nn.AdaptiveMaxPool2d(1)
        p.add(n, "pool", before, f"kept global: {new}",
              f"pooling='global': one vector for any input size, {shapes}", module=new,
              channels_last=channels_last)
        return True
    if (oh, ow) == (h, w):  # VGG's 7x7, AlexNet's 6x6 at the reference size
        p.add(n, "drop", before, "removed", f"identity at this size, {shapes}")
        return True
    if h % oh or w % ow:
        p.fail(n, f"adaptive pooling from {h}x{w} to {oh}x{ow} has windows of unequal "
                  f"size; choose an input size whose feature map here is a multiple of "
                  f"{oh}x{ow} (e.g. the one the model was trained on)")
    k = (h // oh, w // ow)
    # global pooling slides (its stride is fc_stride); finer adaptive pooling tiles
    stride = p.next_stride() if (oh, ow) == (1, 1) else k
    new = nn.AvgPool2d(k, stride=stride) if op == "avg" else nn.MaxPool2d(k, stride=stride)
    p.add(n, "pool", before, f"{new}" + (" of the map permuted to (B, C, H, W)"
                                          if channels_last else ""),
          f"each cell pools one {k[0]}x{k[1]} window of the map, {shapes}", module=new,
          channels_last=channels_last)
    return True


def _gate(p: _Planner, pool: fx.Node) -> set[fx.Node] | None:
    """The nodes between ``pool`` and the ops that combine it with a spatial map, when
    there are such ops; None when the pooled result is never combined with a map.

    That is squeeze-and-excitation (a pooled gate multiplied into the map): the pooling
    and the gate computed from it are part of the body, not the classifier head; the
    pooling must stay global and the gate's reshapes are not flattens.
    """
    seen = _descendants([pool])
    mixers = [d for d in seen if d is not pool and d.op != "output" and any(
        a not in seen and (s := p.shape(a)) is not None and len(s) == 4 and s[2] * s[3] > 1
        for a in d.all_input_nodes)]
    return seen - _descendants(mixers) if mixers else None


def _descendants(nodes: list[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node that reads them, directly or not."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


# --------------------------------------------------------------------------- plan: flatten

# a Linear or BatchNorm1d reading a 2D tensor that is not a flattened map: why it is refused
_PLAIN_REFUSALS = {
    nn.Linear: "its input is a vector that does not come from flattening a C x H x W feature "
               "map",
    nn.BatchNorm1d: "BatchNorm1d on a vector that is not a flattened feature map",
}


def _check_plain(p: _Planner, n: fx.Node) -> None:
    """Refuse a Linear or BatchNorm1d whose vector input is not a flattened feature map."""
    if n.op != "call_module":
        return
    why = _by_type(_PLAIN_REFUSALS, type(p.module(n)))
    s = p.shape(n.all_input_nodes[0]) if n.all_input_nodes else None
    if why is not None and s is not None and len(s) == 2:
        origin = _vector_origin(p.gm, p.shapes, n.all_input_nodes[0])
        p.fail(n, f"{why} ({origin or 'a reshape into a sequence, a token or an index'})")


def _plan_flatten(p: _Planner, n: fx.Node) -> None:
    """Plan the removal of a reshape of a ``(B, C, H, W)`` map to ``(B, C*H*W)``."""
    if not _is_reshape(p.gm, n) or not n.args or not isinstance(n.args[0], fx.Node):
        return
    src = p.alias.get(n.args[0].name, n.args[0])
    s_in, s_out = p.shape(src), p.shape(n)
    if s_in is None or s_out is None or len(s_in) != 4 or s_in[0] != _BATCH:
        return
    c, h, w = s_in[1:]
    if len(s_out) == 3 and (h, w) == (1, 1):
        _plan_squeeze_pair(p, n, src)
    elif len(s_out) == 2 and s_out == (_BATCH, c * h * w):
        p.add(n, "drop", f"flatten {c}x{h}x{w} -> {c * h * w}", "removed",
              "the map stays (B, C, h, w): the layer that reads it takes it whole")
        p.plan.layouts[n.name] = p.flat(c, h, w)


def _plan_squeeze_pair(p: _Planner, n: fx.Node, src: fx.Node) -> None:
    """``(B, C, 1, 1) -> (B, C, 1) -> (B, C)``: drop the first squeeze, the second is the
    flatten."""
    users = list(n.users)
    c = p.shape(src)[1]
    if len(users) == 1 and _is_reshape(p.gm, users[0]) and p.shape(users[0]) == (_BATCH, c):
        p.add(n, "squeeze_pair", f"squeeze {fmt_shape(p.shape(src))} -> {fmt_shape(p.shape(n))}",
              "removed", "the first of two squeezes; the second is removed as the flatten",
              shown=False)
        p.alias[n.name] = src


# --------------------------------------------------------------------------- plan: vector ops

# A rule plans one op that reads the flattened vector: rule(planner, node, layout, vector
# inputs) returns the layout of the op's result (None: not a tensor) or refuses.
_Rule = Callable[[_Planner, fx.Node, Layout, list], Layout | None]


def _plan_vector_op(p: _Planner, n: fx.Node, vin: list[fx.Node]) -> None:
    """Plan an op on the flattened vector by its rule; refuse an op without one."""
    layouts = {p.vector(a) for a in vin}
    if len(layouts) != 1:
        p.fail(n, "it mixes flattened vectors of different layouts")
    if _is_reshape(p.gm, n):
        rule: _Rule | None = _plan_reshape
    elif n.op == "call_module":
        rule = _by_type(_MODULE_RULES, type(p.module(n)))
    else:
        rule = _CALL_RULES.get((n.op, n.target))
    if rule is None:
        p.unsupported(n)
    out = rule(p, n, layouts.pop(), vin)
    if out is not None:
        p.plan.layouts[n.name] = out


def _plan_linear(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """Linear on the vector: a convolution whose kernel covers the flattened H x W."""
    lin = p.module(n)
    if n.args[0] not in vin or len(n.all_input_nodes) != 1:
        p.fail(n, "Linear with extra tensor inputs")
    c, h, w = layout.c, layout.h, layout.w
    if lin.in_features != c * h * w:  # pragma: no cover - the probe would have failed
        p.fail(n, f"Linear expects {lin.in_features} inputs, the map gives {c * h * w}")
    if p.first_call(n, layout):
        stride = p.next_stride() if (h, w) != (1, 1) else 1
        s = f", stride {stride}" if stride != 1 else ""
        hwc = layout.order == "hwc" and (h, w) != (1, 1)
        p.add(n, "linear_to_conv", f"Linear {lin.in_features} -> {lin.out_features}",
              f"Conv2d {c} -> {lin.out_features}, kernel {h}x{w}{s}",
              f"{lin.out_features} filters of {c}x{h}x{w}, one per window of the map"
              + ("; rows reordered from (H, W, C)" if hwc else ""),
              layout=layout, stride=stride)
    return p.flat(lin.out_features)


def _plan_batchnorm1d(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """BatchNorm1d on a C x 1 x 1 vector: BatchNorm2d over the channels."""
    bn = p.module(n)
    if (layout.h, layout.w) != (1, 1):
        p.fail(n, f"BatchNorm1d over a flattened {layout.c}x{layout.h}x{layout.w} volume "
                  "normalises each position separately and cannot slide")
    if p.first_call(n, layout):
        p.add(n, "bn1d_to_bn2d", f"{bn}", f"BatchNorm2d({bn.extra_repr()})",
              "the same statistics, per channel of the map")
    return layout


def _plan_softmax_module(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """nn.Softmax / nn.LogSoftmax over the features: the same over the channels."""
    mod = p.module(n)
    if mod.dim not in (None, 1, -1):
        p.fail(n, f"{type(mod).__name__}(dim={mod.dim}) is not over the features")
    if p.first_call(n, layout):
        new = type(mod)(dim=1)
        p.add(n, "softmax_dim", f"{mod}", f"{new} (over channels)",
              "the features are the channels of the map", module=new)
    return layout


def _plan_softmax_call(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """softmax / log_softmax called over the features: its dim becomes 1."""
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    if dim not in (None, 1, -1):
        p.fail(n, f"softmax over dim={dim} is not over the features")
    # the dim goes where it was given; a call without one gets the keyword
    dim_at = 1 if "dim" not in n.kwargs and len(n.args) > 1 else "dim"
    fn = getattr(n.target, "__name__", n.target)
    p.add(n, "softmax_dim", f"{fn} over dim={dim}", f"{fn} over dim=1",
          "the features are the channels of the map", shown=False, dim_at=dim_at)
    return layout


def _plan_layer_norm(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """LayerNorm over the C features of a pooled C x 1 x 1 vector: the same over the
    channels of each map cell (run channels-last, then permuted back)."""
    if n.args[0] not in vin or any(p.vector(a) is not None for a in n.all_input_nodes[1:]):
        p.fail(n, "LayerNorm whose weight or bias is the feature vector")
    if n.op == "call_module":
        shape = tuple(p.module(n).normalized_shape)
    else:
        shape = tuple(n.kwargs.get("normalized_shape", n.args[1] if len(n.args) > 1 else ()))
    if (layout.h, layout.w) != (1, 1) or shape != (layout.c,):
        p.fail(n, f"LayerNorm over {shape} of a flattened {layout.c}x{layout.h}x{layout.w} "
                  "volume normalises across positions, so it cannot be applied window by window")
    p.add(n, "last_dim", f"LayerNorm over {layout.c} features",
          f"LayerNorm over the {layout.c} channels of each cell",
          "the features are the channels of the map", shown=n.op == "call_module")
    return layout


def _plan_prelu(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """PReLU: one slope, or one per channel of a C x 1 x 1 vector."""
    if p.module(n).num_parameters != 1 and (layout.h, layout.w) != (1, 1):
        p.fail(n, "PReLU with per-feature slopes on a flattened volume")
    return layout


def _plan_elementwise(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """An activation, dropout or cast of the vector alone: per window as it is."""
    if any(a not in vin for a in n.all_input_nodes):
        p.fail(n, "elementwise op with another tensor operand")
    return layout


def _plan_binary(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """Arithmetic between vectors of one layout, or with a scalar."""
    for a in n.all_input_nodes:
        s = p.shape(a)
        if a not in vin and s is not None and len(s) > 0 and int(torch.Size(s).numel()) != 1:
            p.fail(n, "arithmetic between the flattened vector and a tensor of another shape")
    return layout


def _plan_reshape(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> Layout:
    """A reshape that leaves the ``(B, C*H*W)`` vector as it is: dropped."""
    if p.shape(n) != (_BATCH, layout.c * layout.h * layout.w):
        p.unsupported(n)
    p.add(n, "drop", f"reshape to {fmt_shape(p.shape(n))}", "removed",
          "it keeps the vector's shape", shown=False)
    return layout


def _plan_size(p: _Planner, n: fx.Node, layout: Layout, vin: list) -> None:
    """``x.size(0)``: the batch size, unchanged; ``x.size()`` would see the map."""
    if n.kwargs or n.args[1:] not in ((0,), ()):
        p.unsupported(n)
    if n.args[1:] == ():
        p.fail(n, ".size() of the flattened vector (use .size(0))")
    return None


_MODULE_RULES: dict[type, _Rule] = {
    nn.Linear: _plan_linear,
    nn.BatchNorm1d: _plan_batchnorm1d,
    nn.Softmax: _plan_softmax_module,
    nn.LogSoftmax: _plan_softmax_module,
    nn.PReLU: _plan_prelu,
    nn.LayerNorm: _plan_layer_norm,
    **dict.fromkeys(_ELEMENTWISE_MODULES, _plan_elementwise),
}
# (op, target) -> rule: torch.relu(x) and x.relu() follow the same rule
_CALL_RULES: dict[tuple, _Rule] = {
    **{("call_function", f): _plan_binary for f in _BINARY_OPS},
    **{("call_method", m): _plan_binary for m in _BINARY_METHODS},
    **{("call_function", f): _plan_elementwise for f in _ELEMENTWISE_FUNCS},
    **{("call_method", m): _plan_elementwise for m in _ELEMENTWISE_METHODS},
    **{("call_function", f): _plan_softmax_call for f in _SOFTMAX_FUNCS},
    **{("call_method", m): _plan_softmax_call for m in _SOFTMAX_METHODS},
    ("call_method", "size"): _plan_size,
    ("call_function", F.layer_norm): _plan_layer_norm,
}


# --------------------------------------------------------------------------- apply


def _apply(gm: fx.GraphModule, plan: Plan) -> dict[str, str]:
    """Make the planned edits on ``gm``; return which function nodes became module nodes."""
    nodes = {n.name: n for n in gm.graph.nodes}  # looked up before any edit
    replaced: dict[str, str] = {}
    for rep in plan.replacements:
        _APPLY[rep.kind](gm, nodes[rep.node], rep, replaced)
    _copy_written_input(gm)
    drop_dead_code(gm)  # the queries a dropped flatten read; never an in-place write
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return replaced


def _copy_written_input(gm: fx.GraphModule) -> None:
    """A forward that writes into its input (``x.sub_(mean)``) gets a copy of it to write
    into: dense prediction runs several passes over one image (shifts, tiles), and the
    caller's image stays as it was. The outputs are the model's."""
    for n in gm.graph.nodes:
        root = written(gm, n)
        while root is not None and root.op != "placeholder":
            root = viewed(gm, root)
        if root is not None:
            with gm.graph.inserting_after(root):
                copy_ = gm.graph.call_method("clone", (root,))
            root.replace_all_uses_with(copy_, delete_user_cb=lambda u: u is not copy_)
            return


def _apply_linear(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    _set_module(gm, n.target, _conv_from_linear(gm.get_submodule(n.target), rep.layout,
                                                rep.stride))


def _conv_from_linear(lin: nn.Linear, layout: Layout, stride: int) -> nn.Conv2d:
    """The convolution that computes ``lin`` on every window of the map ``layout`` describes."""
    c, h, w = layout.c, layout.h, layout.w
    full = (h, w) != (1, 1)
    # skip_init: no random initialisation of weights that are overwritten next
    conv = nn.utils.skip_init(FullConv2d if full else nn.Conv2d, c, lin.out_features, (h, w),
                              stride=stride, bias=lin.bias is not None,
                              device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        if layout.order == "hwc" and full:
            # the vector was flattened as (H, W, C): reorder to (C, H, W)
            weight = lin.weight.view(lin.out_features, h, w, c).permute(0, 3, 1, 2)
        else:
            weight = lin.weight.view(lin.out_features, c, h, w)
        conv.weight.copy_(weight)
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
    conv.weight.requires_grad_(lin.weight.requires_grad)
    return conv


def _apply_batchnorm(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    old = gm.get_submodule(n.target)
    bn = nn.BatchNorm2d(old.num_features, eps=old.eps, momentum=old.momentum,
                        affine=old.affine, track_running_stats=old.track_running_stats)
    bn.load_state_dict(old.state_dict())
    _set_module(gm, n.target, bn.to(*param_like(old)).eval())


def _apply_softmax(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    if rep.module is not None:
        _set_module(gm, n.target, copy.deepcopy(rep.module))
    elif isinstance(rep.dim_at, str):
        n.kwargs = {**n.kwargs, rep.dim_at: 1}
    else:
        n.args = (*n.args[:rep.dim_at], 1, *n.args[rep.dim_at + 1:])


def _apply_drop(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    """Its readers take its input instead (the map itself)."""
    n.replace_all_uses_with(n.args[0])
    gm.graph.erase_node(n)


def _apply_pool(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    """Swap ``n`` for a call of the planned pooling module on its input."""
    new, src = copy.deepcopy(rep.module), n.args[0]
    if rep.channels_last:
        with gm.graph.inserting_before(n):
            src = gm.graph.call_method("permute", (src, 0, 3, 1, 2))
    if n.op == "call_module":
        _set_module(gm, n.target, new)
        n.args, n.kwargs = (src,), {}
        return
    with gm.graph.inserting_after(n):
        m = gm.graph.call_module(_add_module(gm, "pool", new), (src,))
    n.replace_all_uses_with(m)
    gm.graph.erase_node(n)
    replaced[n.name] = m.name


def _apply_last_dim(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    """Run ``n`` on the map permuted to (B, h, w, C), then permute its result back."""
    with gm.graph.inserting_before(n):
        cl = gm.graph.call_method("permute", (n.args[0], 0, 2, 3, 1))  # (B, h, w, C)
    n.args = (cl, *n.args[1:])
    with gm.graph.inserting_after(n):
        back = gm.graph.call_method("permute", (n, 0, 3, 1, 2))  # (B, C, h, w)
    n.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)


def _apply_fixed_pad(gm: fx.GraphModule, n: fx.Node, rep: Replacement, replaced: dict) -> None:
    if "pad" in n.kwargs:
        n.kwargs = {**n.kwargs, "pad": rep.pad}
    else:
        n.args = (n.args[0], rep.pad, *n.args[2:])


def _set_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, leaf, new)


def _add_module(gm: fx.GraphModule, base: str, new: nn.Module) -> str:
    """Add ``new`` under the first free name ``nofc_<base>``, ``nofc_<base>_1``, ..."""
    name, k = f"nofc_{base}", 0
    while hasattr(gm, name):
        k += 1
        name = f"nofc_{base}_{k}"
    gm.add_submodule(name, new)
    return name


_APPLY: dict[str, Callable[[fx.GraphModule, fx.Node, Replacement, dict], None]] = {
    "linear_to_conv": _apply_linear,
    "bn1d_to_bn2d": _apply_batchnorm,
    "softmax_dim": _apply_softmax,
    "drop": _apply_drop,
    "squeeze_pair": _apply_drop,
    "pool": _apply_pool,
    "last_dim": _apply_last_dim,
    "fixed_pad": _apply_fixed_pad,
}
