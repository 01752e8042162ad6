"""The layers nofc puts into converted networks, and the one output-size formula."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FullConv2d", "conv_output_size"]


def conv_output_size(n: int, kernel: int, stride: int = 1, pad_lo: int = 0, pad_hi: int = 0,
                     dilation: int = 1, ceil_mode: bool = False) -> int:
    """Cells along one axis of a convolution or pooling over ``n`` input pixels (0 if none).

    PyTorch's rule, ``ceil_mode`` included: a last window that starts in the right
    padding is dropped.

    >>> conv_output_size(224, 7, 2, 3, 3), conv_output_size(112, 3, 2, 1, 1)
    (112, 56)
    >>> conv_output_size(5, 2, 2), conv_output_size(5, 2, 2, ceil_mode=True)
    (2, 3)
    """
    k = dilation * (kernel - 1) + 1
    span = n + pad_lo + pad_hi - k
    if not ceil_mode:
        return span // stride + 1 if span >= 0 else 0
    # ceil_mode: a window longer than the input still gives a cell when it starts inside
    out = max(0, -(-span // stride) + 1)
    if (out - 1) * stride >= n + pad_lo:  # the last window must start inside
        out -= 1
    return out


class FullConv2d(nn.Conv2d):
    """The Conv2d a flattened Linear becomes: a kernel as large as the feature map.

    Numerically an ordinary ``nn.Conv2d`` (same parameters, same state_dict). In eager mode
    on the CPU it computes through unfold + matmul when the unfolded input stays under
    ``unfold_budget`` bytes: for a 7x7x512 kernel over a small map that is about twice as
    fast as oneDNN's direct convolution. Scripted, exported or compiled, it is plain
    ``F.conv2d``.

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
        return (conv_output_size(x.shape[2], self.kernel_size[0], self.stride[0]),
                conv_output_size(x.shape[3], self.kernel_size[1], self.stride[1]))

    def _unfold_ok(self, x) -> bool:
        if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dim() != 4:
            return False
        if self.padding != (0, 0) or self.dilation != (1, 1) or self.groups != 1:
            return False
        kh, kw = self.kernel_size
        oh, ow = self._map_size(x)
        cols = x.shape[0] * x.shape[1] * kh * kw * oh * ow
        return oh > 0 and ow > 0 and cols * x.element_size() <= self.unfold_budget

    def _unfold_forward(self, x):
        oh, ow = self._map_size(x)
        cols = F.unfold(x, self.kernel_size, stride=self.stride)  # (B, C*kh*kw, oh*ow)
        out = self.weight.flatten(1) @ cols  # (B, O, oh*ow)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(x.shape[0], self.out_channels, oh, ow)
