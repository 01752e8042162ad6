"""The layers nofc puts into converted networks, and the one output-size formula."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._fx import register_notrace_module
from .errors import NofcError

__all__ = ["FullConv2d", "DilatedPool2d", "conv_output_size", "pair"]


def pair(v, like: tuple[int, int] | None = None) -> tuple[int, int]:
    """An int or 1- or 2-sequence as ``(a, b)``; ``None`` entries take ``like``'s value.

    >>> pair(3), pair((2,)), pair((None, 5), like=(7, 7)), pair(None, like=(4, 6))
    ((3, 3), (2, 2), (7, 5), (4, 6))
    """
    if v is None:
        if like is None:
            raise NofcError("internal: pair(None) needs like=")
        return like
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) == 1:
        v = (v[0], v[0])
    return tuple(like[i] if a is None and like is not None else int(a)  # type: ignore[misc]
                 for i, a in enumerate(v[:2]))



def conv_output_size(n: int, kernel: int, stride: int = 1, pad_lo: int = 0, pad_hi: int = 0,
                     dilation: int = 1, ceil_mode: bool = False,
                     overhang: int | None = None) -> int:
    """Cells along one axis of a convolution or pooling over ``n`` input pixels (0 if none).

    PyTorch's rule, ``ceil_mode`` included: a window may reach up to ``overhang`` pixels
    (``stride - 1``) past the padded input, and must start before the input's end. A
    dilated pooling (:class:`DilatedPool2d`) keeps the overhang of the original layer.

    >>> conv_output_size(224, 7, 2, 3, 3), conv_output_size(112, 3, 2, 1, 1)
    (112, 56)
    >>> conv_output_size(5, 2, 2), conv_output_size(5, 2, 2, ceil_mode=True)
    (2, 3)
    """
    if n <= 0:  # no pixels, no cells: padding an empty map gives none either
        return 0
    span = n + pad_lo + pad_hi - (dilation * (kernel - 1) + 1)
    if not ceil_mode:
        return span // stride + 1 if span >= 0 else 0
    reach = stride - 1 if overhang is None else overhang
    # a window longer than the input still gives a cell when it starts inside
    return max(0, min(span + reach, n + pad_lo - 1) // stride + 1)


@register_notrace_module
class FullConv2d(nn.Conv2d):
    """The Conv2d a flattened Linear becomes: a kernel as large as the feature map.

    Numerically an ordinary ``nn.Conv2d`` (same parameters, same state_dict). In eager mode
    on the CPU it computes through unfold + matmul (dilated too: ``nofc.dilate``) when the
    unfolded input stays under ``unfold_budget`` bytes: for a 7x7x512 kernel over a small
    map that is about twice as fast as oneDNN's direct convolution. Scripted, exported or
    compiled, it is plain ``F.conv2d``.

    >>> conv = FullConv2d(4, 3, (2, 2))
    >>> conv(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 3, 4, 4])
    """

    unfold_budget: int = 256 << 20

    def forward(self, x):
        if not torch.jit.is_scripting():
            if self._unfold_ok(x):
                return self._unfold_forward(x)
        return self._conv_forward(x, self.weight, self.bias)

    def _map_size(self, x) -> tuple[int, int]:
        return tuple(conv_output_size(x.shape[2 + a], self.kernel_size[a], self.stride[a],
                                      self.padding[a], self.padding[a], self.dilation[a])
                     for a in (0, 1))  # type: ignore[return-value]

    def _unfold_ok(self, x) -> bool:
        if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dim() != 4:
            return False
        if isinstance(self.padding, str) or self.padding_mode != "zeros" or self.groups != 1:
            return False
        kh, kw = self.kernel_size
        oh, ow = self._map_size(x)
        cols = x.shape[0] * x.shape[1] * kh * kw * oh * ow
        return oh > 0 and ow > 0 and cols * x.element_size() <= self.unfold_budget

    def _unfold_forward(self, x):
        oh, ow = self._map_size(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding,
                        self.stride)  # (B, C*kh*kw, oh*ow)
        out = self.weight.flatten(1) @ cols  # (B, O, oh*ow)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(x.shape[0], self.out_channels, oh, ow)


class DilatedPool2d(nn.Module):
    """Average or max pooling over a dilated window, as the dilated network needs it.

    ``"avg"``: PyTorch's ``AvgPool2d`` has no ``dilation``. A depthwise convolution with a
    uniform kernel, divided by the number of taps inside the (padded) input, so that
    ``count_include_pad`` and ``divisor_override`` mean what they mean there. ``"max"``:
    ``max_pool2d`` on an input padded with ``-inf`` (PyTorch allows no padding above half
    the undilated kernel).

    ``ceil_mode`` is that of the interleaved maps. A map whose stride was cut from ``S`` to
    ``stride`` and whose kernel is dilated by ``r`` interleaves the maps of several shifts of
    the image; whether a shift's map has a cell depends only on where the cell lies in the
    image, not on the shift, so PyTorch's rule carries over with the overhang counted in the
    dilated map: a window starts before the input's end and reaches at most
    ``ceil_overhang`` (``(S - 1) * r``; PyTorch's ``stride - 1`` by default) pixels past the
    padded input. The map then holds exactly the cells of the original maps, and taps beyond
    the input are left out, as in each of them.

    >>> pool = DilatedPool2d("avg", 2, 1, 0, 2)
    >>> pool(torch.arange(16.).view(1, 1, 4, 4))
    tensor([[[[ 5.,  6.],
              [ 9., 10.]]]])
    """

    def __init__(self, kind: str, kernel_size, stride=1, padding=0, dilation=1,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None, ceil_overhang=None):
        super().__init__()
        self.kind = kind
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        self.divisor_override = divisor_override
        self.ceil_overhang = tuple(s - 1 for s in self.stride) if ceil_overhang is None \
            else pair(ceil_overhang)

    def extra_repr(self) -> str:
        return (f"{self.kind!r}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, ceil_mode={self.ceil_mode}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        H, W = x.shape[-2], x.shape[-1]
        oh, eh = self._out(H, 0)
        ow, ew = self._out(W, 1)
        pads = (pw, pw + ew, ph, ph + eh)
        if self.kind == "max":
            return F.max_pool2d(F.pad(x, pads, value=float("-inf")), self.kernel_size,
                                self.stride, 0, self.dilation)[..., :oh, :ow]
        ones = torch.ones(x.shape[1], 1, kh, kw, dtype=x.dtype, device=x.device)
        total = F.conv2d(F.pad(x, pads), ones, None, self.stride, 0, self.dilation,
                         x.shape[1])[..., :oh, :ow]
        if self.divisor_override is not None:
            return total / self.divisor_override
        if not self.ceil_mode and (self.count_include_pad or (ph == 0 and pw == 0)):
            return total / (kh * kw)
        # count the taps inside the image (and inside the padding with count_include_pad)
        inside = torch.ones(1, 1, H, W, dtype=x.dtype, device=x.device)
        if self.count_include_pad:
            inside = F.pad(inside, (pw, pw, ph, ph), value=1.0)
            pads = (0, ew, 0, eh)
        count = F.conv2d(F.pad(inside, pads), ones[:1], None, self.stride, 0, self.dilation)
        return total / count[..., :oh, :ow]

    def _out(self, n: int, a: int) -> tuple[int, int]:
        """Cells along axis ``a`` and the end padding beyond ``padding`` they need."""
        k, s, p, d = self.kernel_size[a], self.stride[a], self.padding[a], self.dilation[a]
        out = conv_output_size(n, k, s, p, p, d, self.ceil_mode, self.ceil_overhang[a])
        return out, max(0, (out - 1) * s + d * (k - 1) + 1 - n - 2 * p)
