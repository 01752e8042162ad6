"""Rewrite a classifier so that its fully-connected layers become convolutions.

The rewrite runs on a torch.fx graph of a deep copy of the model:

* a Linear that reads a flattened C x H x W volume becomes ``Conv2d(C, out, (H, W))``;
* every later Linear becomes a 1x1 ``Conv2d``; BatchNorm1d becomes BatchNorm2d;
* the flatten (``nn.Flatten``, ``torch.flatten``, ``x.view(x.size(0), -1)``, ...) is removed;
* adaptive pooling that is the identity at the reference size is removed, and global
  pooling becomes the windowed pooling it stands for (or stays global on request).

Shapes are found by running the graph on fake tensors (no arithmetic, no memory).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._fx import (
    PROBE_BATCH as _BATCH,
    NodeFailure,
    ShapeRecorder,
    describe_node,
    fmt_shape,
    global_pool,
    pair,
    param_like,
    probe,
    trace,
)
from .errors import NofcError, check_input_size, first_line
from .layers import FullConv2d

__all__ = ["convert"]



# --------------------------------------------------------------------------- op tables

_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}

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


# --------------------------------------------------------------------------- records


@dataclass
class Change:
    """One rewritten layer, for explain()."""

    name: str  # module path or node name
    before: str
    after: str
    note: str = ""


@dataclass
class ConversionRecord:
    input_size: tuple[int, int, int]
    pooling: str
    fc_stride: int
    flatten_order: str
    changes: list[Change] = field(default_factory=list)
    shapes_before: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    shapes_after: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # function node -> new module node
    # pooling inside the body (squeeze-and-excitation): map cells see the whole image
    global_context: list[str] = field(default_factory=list)


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
    fcn, _ = _convert(model, input_size, pooling=pooling, fc_stride=fc_stride,
                      flatten_order=flatten_order)
    return fcn


def as_fcn(model: nn.Module, size) -> fx.GraphModule:
    """``model`` itself when nofc converted it for ``size``; else its conversion."""
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    have = getattr(model, "_nofc_input_size", None)
    if have is not None:
        if tuple(have) != tuple(size):
            raise NofcError(f"the network was converted for input_size={tuple(have)}, not "
                            f"{tuple(size)}")
        return model
    return convert(model, size)


def _convert(model, input_size, *, pooling="window", fc_stride=1, flatten_order="chw"):
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = check_input_size(input_size)
    if pooling not in ("window", "global"):
        raise NofcError(f"pooling must be 'window' or 'global', got {pooling!r}")
    if flatten_order not in ("chw", "hwc"):
        raise NofcError(f"flatten_order must be 'chw' or 'hwc', got {flatten_order!r}")
    if not isinstance(fc_stride, int) or isinstance(fc_stride, bool) or fc_stride < 1:
        raise NofcError(f"fc_stride must be a positive integer, got {fc_stride!r}")

    work = copy.deepcopy(model).eval()
    gm = trace(work)
    ref = (_BATCH, *size)
    rec = _probe_or_explain(gm, ref, size, model_name=type(model).__name__)
    record = ConversionRecord(size, pooling, fc_stride, flatten_order)
    record.shapes_before = dict(rec.shapes)

    _Rewriter(gm, rec, record).run()

    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.eval()

    # Check the rewritten graph: same output at the reference size, and it runs larger.
    try:
        after = probe(gm, ref, dtype=param_like(gm)[1])
    except NodeFailure as f:  # pragma: no cover - a bug in the rewrite, not user input
        raise NofcError(f"internal: converted graph fails at {describe_node(gm, f.node)}: "
                        f"{f.exc}") from None
    record.shapes_after = dict(after.shapes)
    _check_outputs(rec, after)
    big = (_BATCH, size[0], 2 * size[1], 2 * size[2])
    try:
        probe(gm, big, dtype=param_like(gm)[1])
    except NodeFailure as f:
        raise NofcError(
            f"{describe_node(gm, f.node)} only works at the reference size: on a "
            f"{size[0]}x{big[2]}x{big[3]} input it fails ({first_line(f.exc)}); "
            "it depends on the spatial size, so the model cannot be made fully convolutional"
        ) from None
    gm._nofc_record = record  # read by explain(); ignored by TorchScript
    gm._nofc_input_size = size
    return gm, record


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


def _check_outputs(before: ShapeRecorder, after: ShapeRecorder) -> None:
    """The classifier's (B, K) output must have become (B, K, 1, 1) at the reference size."""
    sb, sa = before.shapes.get("output"), after.shapes.get("output")
    if sb is not None and sa is not None and len(sb) == 2:
        if not (len(sa) == 4 and sa[:2] == sb and sa[2:] == (1, 1)):
            raise NofcError(f"internal: output {fmt_shape(sb)} became {fmt_shape(sa)}")


class _Rewriter:
    """One pass over the graph: classify nodes, then rewrite the head."""

    def __init__(self, gm: fx.GraphModule, rec: ShapeRecorder, record: ConversionRecord):
        self.gm = gm
        self.shapes = rec.shapes
        self.values = rec.values
        self.record = record
        # node name -> (C, H, W): the node is a flattened feature vector of that layout
        self.vec: dict[str, tuple[int, int, int]] = {}
        self.stride_used = False
        self.converted_modules: dict[str, tuple[int, int, int]] = {}
        self.counter = 0
        self.dropped: list[fx.Node] = []

    # -- small utilities
    def shape(self, n) -> tuple[int, ...] | None:
        return self.shapes.get(n.name) if isinstance(n, fx.Node) else None

    def fail(self, n: fx.Node, why: str):
        ins = [self.shape(a) for a in n.all_input_nodes]
        raise NofcError(
            f"cannot convert {describe_node(self.gm, n)}: {why} "
            f"(input {', '.join(fmt_shape(s) for s in ins) or '-'}, "
            f"output {fmt_shape(self.shape(n))}); nothing was converted"
        )

    def set_module(self, target: str, new: nn.Module):
        parent_name, _, leaf = target.rpartition(".")
        parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
        setattr(parent, leaf, new)

    def add_module(self, base: str, new: nn.Module) -> str:
        name = f"nofc_{base}"
        while hasattr(self.gm, name):
            self.counter += 1
            name = f"nofc_{base}_{self.counter}"
        self.gm.add_submodule(name, new)
        return name

    def next_stride(self) -> int:
        if self.stride_used:
            return 1
        self.stride_used = True
        return self.record.fc_stride

    # -- the pass
    def run(self):
        for n in list(self.gm.graph.nodes):
            if n.op in ("placeholder", "get_attr", "output"):
                continue
            vin = [a for a in n.all_input_nodes if a.name in self.vec]
            if self._try_pool(n):
                continue
            if not vin:
                self._check_plain(n)
                self._try_flatten(n)
                continue
            self._vector_op(n, vin)
        if not self.stride_used and self.record.fc_stride != 1:
            raise NofcError(
                f"fc_stride={self.record.fc_stride} has no layer to act on: the model has no "
                "flattened Linear or global pooling"
            )
        self.finish()

    def _check_plain(self, n: fx.Node):
        """A Linear reading something other than a flattened feature map."""
        if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Linear):
            s = self.shape(n.all_input_nodes[0]) if n.all_input_nodes else None
            if s is not None and len(s) == 2:
                self.fail(n, "its input is a vector that does not come from flattening a "
                             "C x H x W feature map (a reshape into a sequence, a token or "
                             "an index in between?)")
        if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.BatchNorm1d):
            s = self.shape(n.all_input_nodes[0]) if n.all_input_nodes else None
            if s is not None and len(s) == 2:
                self.fail(n, "BatchNorm1d on a vector that is not a flattened feature map")

    def _try_flatten(self, n: fx.Node) -> bool:
        is_reshape = (
            (n.op == "call_function" and n.target in _RESHAPE_FUNCS)
            or (n.op == "call_method" and n.target in _RESHAPE_METHODS)
            or (n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Flatten))
        )
        if not is_reshape or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        src = n.args[0]
        s_in, s_out = self.shape(src), self.shape(n)
        if s_in is None or s_out is None:
            return False
        # squeeze of (B, C, 1, 1) in two steps: (B, C, 1, 1) -> (B, C, 1) -> (B, C)
        if len(s_in) == 4 and len(s_out) == 3 and s_in[0] == _BATCH and s_in[2:] == (1, 1):
            users = list(n.users)
            if len(users) == 1 and self._is_reshape(users[0]):
                nxt = users[0]
                if self.shape(nxt) == (_BATCH, s_in[1]):
                    n.replace_all_uses_with(src)
                    self.gm.graph.erase_node(n)
                    self.shapes[src.name] = s_in
                    return True
            return False
        if len(s_in) == 4 and len(s_out) == 2 and s_in[0] == _BATCH and s_out[0] == _BATCH:
            c, h, w = s_in[1:]
            if s_out[1] != c * h * w:
                return False
            self.record.changes.append(Change(
                n.name if n.op != "call_module" else n.target,
                f"flatten {c}x{h}x{w} -> {c * h * w}",
                "removed: the map stays (B, C, h, w)",
            ))
            # Removed after the pass; its readers see the 4D map as a vector.
            self.drop_later(n)
            self.vec[n.name] = (c, h, w)
            return True
        return False

    def _is_reshape(self, n: fx.Node) -> bool:
        return (
            (n.op == "call_function" and n.target in _RESHAPE_FUNCS)
            or (n.op == "call_method" and n.target in _RESHAPE_METHODS)
            or (n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Flatten))
        )

    def _mixes_with_map(self, p: fx.Node) -> bool:
        """True when the pooled result is later combined with a spatial map.

        That is squeeze-and-excitation (a pooled gate multiplied into the map): the pooling
        is part of the body, not the classifier head, and must stay global.
        """
        seen = {p}
        todo = [p]
        while todo:
            cur = todo.pop()
            for u in cur.users:
                if u in seen:
                    continue
                seen.add(u)
                todo.append(u)
        for d in seen:
            if d is p or d.op == "output":
                continue
            for a in d.all_input_nodes:
                if a in seen:
                    continue
                s = self.shape(a)
                if s is not None and len(s) == 4 and s[2] * s[3] > 1:
                    return True
        return False

    def _try_pool(self, n: fx.Node) -> bool:
        kind = global_pool(self.gm, n)
        if kind is None or kind[0] == "sum" or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        if self._mixes_with_map(n):
            self.record.global_context.append(n.target if n.op == "call_module" else n.name)
            return True
        src = n.args[0]
        s_in, s_out = self.shape(src), self.shape(n)
        if s_in is None or s_out is None or len(s_in) != 4:
            return False
        if src.name in self.vec:
            self.fail(n, "pooling over a flattened vector")
        op, out_size = kind
        h, w = s_in[2:]
        oh, ow = pair(out_size, (h, w))
        label = n.target if n.op == "call_module" else n.name
        before = (f"{'Adaptive' if n.op == 'call_module' else 'global '}{op}pool "
                  f"-> {oh}x{ow}  {fmt_shape(s_in)} -> {fmt_shape(s_out)}")
        is_global = (oh, ow) == (1, 1)
        if self.record.pooling == "global":
            if is_global:
                new = nn.AdaptiveAvgPool2d(1) if op == "avg" else nn.AdaptiveMaxPool2d(1)
                m = self._replace_with_module(n, src, new, "pool")
                self.record.changes.append(Change(label, before, f"kept global: {new}"))
                if len(s_out) == 2:
                    self.vec[m.name] = (s_in[1], 1, 1)
            return True
        if (oh, ow) == (h, w):
            # identity at the reference size (VGG's 7x7, AlexNet's 6x6): remove it
            self.drop_later(n)
            self.record.changes.append(Change(label, before, "removed: identity at this size"))
            if len(s_out) == 2:
                self.vec[n.name] = (s_in[1], 1, 1)
            return True
        if h % oh or w % ow:
            self.fail(n, f"adaptive pooling from {h}x{w} to {oh}x{ow} has windows of unequal "
                         f"size; choose an input size whose feature map here is a multiple of "
                         f"{oh}x{ow} (e.g. the one the model was trained on)")
        k = (h // oh, w // ow)
        if is_global:
            stride: Any = self.next_stride()
        else:
            stride = k
        new = (nn.AvgPool2d(k, stride=stride) if op == "avg"
               else nn.MaxPool2d(k, stride=stride))
        m = self._replace_with_module(n, src, new, "pool")
        self.record.changes.append(Change(label, before, f"{new}"))
        if len(s_out) == 2:
            self.vec[m.name] = (s_in[1], 1, 1)
        return True

    def _replace_with_module(self, n: fx.Node, src: fx.Node, new: nn.Module, base: str):
        """Swap ``n`` for a call of ``new`` on ``src``; return the node that now holds it."""
        if n.op == "call_module":
            self.set_module(n.target, new)
            n.args = (src,)
            n.kwargs = {}
            return n
        name = self.add_module(base, new)
        with self.gm.graph.inserting_after(n):
            m = self.gm.graph.call_module(name, (src,))
        n.replace_all_uses_with(m)
        self.gm.graph.erase_node(n)
        self.shapes[m.name] = self.shapes.get(n.name)
        self.record.replaced[n.name] = m.name
        return m

    def drop_later(self, n: fx.Node):
        """Mark ``n`` (a flatten or an identity pool) for removal after the pass."""
        self.dropped.append(n)

    def finish(self):
        for n in self.dropped:
            n.replace_all_uses_with(n.args[0])
            self.gm.graph.erase_node(n)

    def _vector_op(self, n: fx.Node, vin: list[fx.Node]):
        layouts = {self.vec[a.name] for a in vin}
        if len(layouts) != 1:
            self.fail(n, "it mixes flattened vectors of different layouts")
        layout = layouts.pop()
        c, h, w = layout
        gm = self.gm
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.Linear):
                if n.args[0] not in vin or len(n.all_input_nodes) != 1:
                    self.fail(n, "Linear with extra tensor inputs")
                self._linear_to_conv(n, mod, layout)
                return
            if isinstance(mod, nn.BatchNorm1d):
                if (h, w) != (1, 1):
                    self.fail(n, f"BatchNorm1d over a flattened {c}x{h}x{w} volume normalises "
                                 "each position separately and cannot slide")
                bn = nn.BatchNorm2d(mod.num_features, eps=mod.eps, momentum=mod.momentum,
                                    affine=mod.affine,
                                    track_running_stats=mod.track_running_stats)
                bn.load_state_dict(mod.state_dict())
                bn.to(*param_like(mod)).eval()
                self.set_module(n.target, bn)
                self.record.changes.append(Change(n.target, f"{mod}", f"{bn}"))
                self.vec[n.name] = layout
                return
            if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
                if mod.dim not in (None, 1, -1):
                    self.fail(n, f"{type(mod).__name__}(dim={mod.dim}) is not over the features")
                new = type(mod)(dim=1)
                self.set_module(n.target, new)
                self.record.changes.append(Change(n.target, f"{mod}", f"{new} (over channels)"))
                self.vec[n.name] = layout
                return
            if isinstance(mod, nn.PReLU):
                if mod.num_parameters != 1 and (h, w) != (1, 1):
                    self.fail(n, "PReLU with per-feature slopes on a flattened volume")
                self.vec[n.name] = layout
                return
            if isinstance(mod, nn.Flatten):
                self.drop_later(n)
                self.vec[n.name] = layout
                return
            if isinstance(mod, _ELEMENTWISE_MODULES):
                self.vec[n.name] = layout
                return
            self.fail(n, f"{type(mod).__name__} cannot be applied window by window to the "
                         "flattened feature vector")
        if n.op in ("call_function", "call_method"):
            # the same rules for torch.relu(x) and x.relu(): only the tables differ
            tables = ((_SOFTMAX_FUNCS, _ELEMENTWISE_FUNCS, _BINARY_OPS, _RESHAPE_FUNCS)
                      if n.op == "call_function" else
                      (_SOFTMAX_METHODS, _ELEMENTWISE_METHODS, _BINARY_METHODS, _RESHAPE_METHODS))
            softmax, elementwise, binary, reshape = tables
            if n.target in softmax:
                self._fix_softmax_dim(n)
                self.vec[n.name] = layout
                return
            if n.target in elementwise:
                if any(a not in vin for a in n.all_input_nodes):
                    self.fail(n, "elementwise op with another tensor operand")
                self.vec[n.name] = layout
                return
            if n.target in binary:
                self._binary(n, vin, layout)
                return
            if n.op == "call_method" and n.target == "size" and not n.kwargs \
                    and n.args[1:] in ((0,), ()):
                if n.args[1:] == ():
                    self.fail(n, ".size() of the flattened vector (use .size(0))")
                return  # batch size: unchanged by the rewrite
            if n.target in reshape and self._same_vector_shape(n, layout):
                self.drop_later(n)
                self.vec[n.name] = layout
                return
        self.fail(n, "this op on the flattened feature vector has no per-window equivalent")

    def _same_vector_shape(self, n, layout) -> bool:
        c, h, w = layout
        return self.shape(n) == (_BATCH, c * h * w)

    def _binary(self, n, vin, layout):
        for a in n.all_input_nodes:
            if a in vin:
                continue
            s = self.shape(a)
            if s is not None and len(s) > 0 and int(torch.Size(s).numel()) != 1:
                self.fail(n, "arithmetic between the flattened vector and a tensor of another "
                             "shape")
        self.vec[n.name] = layout

    def _fix_softmax_dim(self, n: fx.Node):
        args = list(n.args)
        dim_pos = 1
        dim = n.kwargs.get("dim", args[dim_pos] if len(args) > dim_pos else None)
        if dim not in (None, 1, -1):
            self.fail(n, f"softmax over dim={dim} is not over the features")
        if "dim" in n.kwargs:
            kw = dict(n.kwargs)
            kw["dim"] = 1
            n.kwargs = kw
        elif len(args) > dim_pos:
            args[dim_pos] = 1
            n.args = tuple(args)
        else:
            kw = dict(n.kwargs)
            kw["dim"] = 1
            n.kwargs = kw

    def _linear_to_conv(self, n: fx.Node, lin: nn.Linear, layout):
        c, h, w = layout
        if lin.in_features != c * h * w:  # pragma: no cover - the probe would have failed
            self.fail(n, f"Linear expects {lin.in_features} inputs, the map gives {c * h * w}")
        prev = self.converted_modules.get(n.target)
        if prev is not None:
            if prev != layout:
                self.fail(n, "a shared Linear reads vectors of different layouts")
            self.vec[n.name] = (lin.out_features, 1, 1)
            return
        stride = self.next_stride() if (h, w) != (1, 1) else 1
        device, dtype = lin.weight.device, lin.weight.dtype
        # skip_init: no random initialisation of weights that are overwritten next
        conv_type = FullConv2d if (h, w) != (1, 1) else nn.Conv2d
        conv = nn.utils.skip_init(conv_type, c, lin.out_features, (h, w), stride=stride,
                                  bias=lin.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            weight = lin.weight
            if self.record.flatten_order == "hwc" and (h, w) != (1, 1):
                # the vector was flattened as (H, W, C): reorder to (C, H, W)
                weight = weight.view(lin.out_features, h, w, c).permute(0, 3, 1, 2)
            else:
                weight = weight.view(lin.out_features, c, h, w)
            conv.weight.copy_(weight)
            if lin.bias is not None:
                conv.bias.copy_(lin.bias)
        conv.weight.requires_grad_(lin.weight.requires_grad)
        self.set_module(n.target, conv)
        self.converted_modules[n.target] = layout
        self.vec[n.name] = (lin.out_features, 1, 1)
        s = f", stride {stride}" if stride != 1 else ""
        self.record.changes.append(Change(
            n.target,
            f"Linear {lin.in_features} -> {lin.out_features}",
            f"Conv2d {c} -> {lin.out_features}, kernel {h}x{w}{s}: "
            f"{lin.out_features} filters of {c}x{h}x{w}",
        ))
