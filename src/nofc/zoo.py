"""Small reference classifiers that ship with nofc (for learning and tests)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["LeNet5", "lenet5", "MODELS"]


class LeNet5(nn.Module):
    """LeNet-5 as in LeCun, Bottou, Bengio and Haffner (1998): 32x32 input, no padding.

    C1 conv 6@5x5 -> S2 pool -> C3 conv 16@5x5 -> S4 pool -> C5 conv 120@5x5 (on the 5x5x16
    maps: already a full connection) -> F6 Linear 120->84 -> output Linear 84->10.
    Subsampling is average pooling and the squashing function tanh (the paper's S2/S4
    trainable coefficients are left out).

    >>> LeNet5()(torch.randn(2, 1, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.s2 = nn.AvgPool2d(2)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.s4 = nn.AvgPool2d(2)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.f6 = nn.Linear(120, 84)
        self.output = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.s2(torch.tanh(self.c1(x)))  # (B, 6, 14, 14)
        x = self.s4(torch.tanh(self.c3(x)))  # (B, 16, 5, 5)
        x = torch.tanh(self.c5(x))  # (B, 120, 1, 1)
        x = x.view(x.size(0), -1)  # (B, 120)
        x = torch.tanh(self.f6(x))
        return self.output(x)


def lenet5() -> LeNet5:
    """LeNet-5 with random weights."""
    return LeNet5()


MODELS = {"lenet5": lenet5}
