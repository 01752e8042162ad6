"""The before/after table: every layer, its shapes, kernel and parameters.

What changed, and how, is read from the conversion's plan (``record.plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from ._fx import NodeFailure, param_like, probe, trace
from .conversion import ConversionRecord, Replacement, convert_with_record
from .errors import NofcError, first_line

__all__ = ["explain", "Explanation"]


def _pair_txt(v) -> str:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return "x".join(str(int(t)) for t in v)


def _describe_module(mod: nn.Module) -> tuple[str, str]:
    """(op, kernel) in a few characters."""
    if isinstance(mod, nn.Linear):
        return f"Linear {mod.in_features}->{mod.out_features}", "-"
    if isinstance(mod, nn.modules.conv._ConvNd):
        extra = []
        if any(s != 1 for s in mod.stride):
            extra.append(f"s{_pair_txt(mod.stride)}")
        if isinstance(mod.padding, str) or any(p != 0 for p in mod.padding):
            pad = mod.padding if isinstance(mod.padding, str) else _pair_txt(mod.padding)
            extra.append(f"p{pad}")
        if mod.groups != 1:
            extra.append(f"g{mod.groups}")
        kernel = f"{mod.out_channels}x{mod.in_channels // mod.groups}x{_pair_txt(mod.kernel_size)}"
        kind = "Conv2d" if isinstance(mod, nn.Conv2d) else type(mod).__name__  # FullConv2d too
        return (f"{kind} {mod.in_channels}->{mod.out_channels} "
                + " ".join(extra)).strip(), kernel
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        s = mod.stride if mod.stride is not None else mod.kernel_size
        return f"{type(mod).__name__} s{_pair_txt(s)}", _pair_txt(mod.kernel_size)
    if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return f"{type(mod).__name__}({mod.output_size})", "-"
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return f"{type(mod).__name__}({mod.num_features})", "-"
    return type(mod).__name__, "-"


def _n_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters(recurse=False))


def _shape_txt(s) -> str:
    if s is None:
        return "-"
    return "x".join(str(v) for v in s[1:]) if len(s) > 1 else str(s[0])


@dataclass
class Row:
    name: str
    op_before: str
    kernel_before: str
    shape_before: str
    op_after: str
    kernel_after: str
    shape_after: str
    shape_at: str
    params_before: int
    params_after: int
    changed: bool


@dataclass
class Explanation:
    """Printable table; ``rows`` hold the data, ``str()`` the text."""

    model_name: str
    input_size: tuple[int, int, int]
    at: tuple[int, int] | None
    rows: list[Row] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    output_before: tuple[int, ...] = ()
    output_after: tuple[int, ...] = ()
    output_at: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        c, h, w = self.input_size
        at = f" and at {self.at[0]}x{self.at[1]}" if self.at else ""
        head = [f"{self.model_name}: before and after conversion at input {c}x{h}x{w}{at} "
                "(shapes without the batch; * = rewritten)"]
        cols = ["", "layer", "before", "kernel", "output", "after", "kernel", "output"]
        if self.at:
            cols.append(f"at {self.at[0]}x{self.at[1]}")
        cols.append("params")
        table = []
        for r in self.rows:
            line = ["*" if r.changed else "", r.name, r.op_before, r.kernel_before,
                    r.shape_before, r.op_after, r.kernel_after, r.shape_after]
            if self.at:
                line.append(r.shape_at)
            line.append(f"{r.params_before:,}" if r.params_before == r.params_after
                        else f"{r.params_before:,}->{r.params_after:,}")
            table.append(line)
        widths = [max(len(str(x[i])) for x in [cols, *table]) for i in range(len(cols))]
        fmt = "  ".join("{:<%d}" % wd for wd in widths)
        out = head + [fmt.format(*cols).rstrip()]
        out += [fmt.format(*line).rstrip() for line in table]
        same = "equal" if self.params_before == self.params_after else "DIFFERENT"
        out.append(f"parameters: {self.params_before:,} before, {self.params_after:,} after "
                   f"({same})")
        ob = _shape_txt(self.output_before)
        oa = _shape_txt(self.output_after)
        line = f"output: {ob} before, {oa} after"
        if self.at and self.output_at is not None:
            line += f"; at {self.at[0]}x{self.at[1]}: {_shape_txt(self.output_at)}"
        out.append(line)
        out += self.notes
        return "\n".join(out)

    __repr__ = __str__


def explain(
    model: nn.Module,
    input_size,
    *,
    at=None,
    pooling: str = "window",
    fc_stride: int = 1,
    flatten_order: str = "chw",
) -> Explanation:
    """Convert ``model`` and tabulate each layer before and after.

    Args:
        model: the classifier (not modified).
        input_size: ``(C, H, W)`` reference size.
        at: optional larger ``(H, W)``; adds a column with the converted model's shapes there.
        pooling, fc_stride, flatten_order: as in :func:`nofc.convert`.

    >>> import torchvision, nofc
    >>> table = nofc.explain(torchvision.models.vgg16(), input_size=(3, 224, 224), at=(384, 384))
    >>> table.output_at
    (1, 1000, 6, 6)
    """
    fcn, record = convert_with_record(model, input_size, pooling=pooling, fc_stride=fc_stride,
                                      flatten_order=flatten_order)
    original = trace(model, record.input_size)  # tracing reads the model, it does not change it
    at_hw, shapes_at = _shapes_at(fcn, record.input_size, at)
    ex = Explanation(type(model).__name__, record.input_size, at_hw)
    # the plan's shown replacements, by module path (a shared module has one) or node name
    planned = {r.name: r for r in record.changes}
    after_nodes = {n.name: n for n in fcn.graph.nodes}
    for n in original.graph.nodes:
        rep = planned.get(n.target if n.op == "call_module" else n.name)
        if n.op == "call_module" or rep is not None:
            ex.rows.append(_row(original, fcn, n, rep, record, after_nodes, shapes_at))
    ex.params_before = sum(p.numel() for p in model.parameters())
    ex.params_after = sum(p.numel() for p in fcn.parameters())
    ex.output_before = record.shapes_before.get("output") or ()
    ex.output_after = record.shapes_after.get("output") or ()
    if at is not None:
        ex.output_at = shapes_at.get("output")
    if not any(r.kind == "linear_to_conv" for r in record.plan.replacements):
        ex.notes.append("no Linear to convert: the classifier already is convolutional; "
                        "only pooling and flatten changed")
    if any("Linear" in r.op_after for r in ex.rows if r.changed):  # pragma: no cover
        ex.notes.append("warning: a Linear was left in place")
    return ex


def _shapes_at(fcn: fx.GraphModule, size, at) -> tuple[tuple[int, int] | None, dict | None]:
    """``at`` as ``(H, W)`` and the converted model's shapes there (None, None without it)."""
    if at is None:
        return None, None
    try:
        ah, aw = (int(at[0]), int(at[1]))
    except (TypeError, ValueError, IndexError):
        raise NofcError(f"at must be (H, W), got {at!r}") from None
    try:
        return (ah, aw), probe(fcn, (1, size[0], ah, aw), dtype=param_like(fcn)[1]).shapes
    except NodeFailure as f:
        raise NofcError(f"the converted model does not run at {ah}x{aw}: node "
                        f"'{f.node.name}' fails ({first_line(f.exc)}); "
                        "is the input smaller than the window?") from None


def _row(original: fx.GraphModule, fcn: fx.GraphModule, n: fx.Node, rep: Replacement | None,
         record: ConversionRecord, after_nodes: dict, shapes_at: dict | None) -> Row:
    """The row of node ``n`` of the original graph; ``rep`` is its planned replacement."""
    if n.op == "call_module":
        mod = original.get_submodule(n.target)
        op_b, k_b = _describe_module(mod)
        p_b = _n_params(mod)
    else:
        op_b, k_b, p_b = rep.before, "-", 0
    if n.op == "call_module" and n.name in after_nodes:
        new = after_nodes[n.name]
    elif rep is not None and rep.kind == "fixed_pad":  # the same node, its amounts fixed
        return Row(rep.name, op_b, k_b, _shape_txt(record.shapes_before.get(n.name)),
                   rep.after, "-", _shape_txt(record.shapes_after.get(n.name)),
                   "" if shapes_at is None else _shape_txt(shapes_at.get(n.name)), 0, 0, True)
    elif rep is not None and rep.kind == "drop":
        return Row(rep.name, op_b, k_b, _shape_txt(record.shapes_before.get(n.name)),
                   "removed", "-", "-", "" if shapes_at is None else "-", p_b, 0, True)
    else:  # a function replaced by a module (global pooling written as a function)
        new = after_nodes.get(record.replaced.get(n.name))
    if new is None:
        op_a, k_a, p_a, s_a, s_at = "-", "-", 0, "-", ""
    else:
        mod_a = fcn.get_submodule(new.target)
        op_a, k_a = _describe_module(mod_a)
        p_a = _n_params(mod_a)
        s_a = _shape_txt(record.shapes_after.get(new.name))
        s_at = "" if shapes_at is None else _shape_txt(shapes_at.get(new.name))
    return Row(n.target if n.op == "call_module" else n.name, op_b, k_b,
               _shape_txt(record.shapes_before.get(n.name)), op_a, k_a, s_a, s_at, p_b, p_a,
               rep is not None)
