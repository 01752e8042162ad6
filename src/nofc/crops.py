"""A map for every classifier: the classifier itself on every window, in batches.

Where ``convert`` refuses a classifier (a ViT or Swin reading a class token, a head that
reshapes its sequence), its map can still be made the way patch pipelines make it: crop
each window of the image and run the classifier on it. :class:`CropNet` does that as a
network with a known :class:`~nofc.windows.Geometry` (stride = the step, window = the
input size, offset 0, exact by construction), so ``dense_predict`` and ``tiled_predict``
run it with the same tiling, masks, sinks and resumable stores as a converted network.
It costs one whole forward per window: a converted network shares the work of
overlapping windows, so the converted path stays the default wherever it exists.

Flow: classifier -> (convert, or CropNet where it refuses) -> geometry -> dense/tiled.

>>> import torch, nofc
>>> net = CropNet(nofc.zoo.LeNet5().eval(), (1, 32, 32), step=8)
>>> net(torch.randn(1, 1, 48, 40)).shape
torch.Size([1, 10, 3, 2])
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .conversion import as_fcn
from .errors import NofcError, call_model, check_input_size
from .onnx_net import OnnxNet, is_onnx
from .windows import Geometry, parse_step

__all__ = ["CropNet", "crop_scores", "map_network"]

CROPS_PER_BATCH = 64  # windows per forward of the classifier
METHODS = ("auto", "dilate", "shift", "crops")  # how a map is made (dense_predict's method)


class CropNet(nn.Module):
    """``classifier`` on every ``input_size`` window at ``step``, as a ``(B, K, h, w)`` map.

    Cell ``(i, j)`` is the classifier's output on the crop starting at
    ``(i * step_y, j * step_x)``: exactly, whatever the classifier (padding, global
    context and class tokens included). Its geometry: :meth:`geometry_for`.
    """

    def __init__(self, classifier: nn.Module, input_size, step, *,
                 batch: int = CROPS_PER_BATCH):
        super().__init__()
        self.classifier = classifier
        self.input_size = check_input_size(input_size)
        self.step = parse_step(step)
        self.batch = int(batch)
        self.train(classifier.training)  # an eval-mode classifier needs no copy to run

    def geometry_for(self, size) -> Geometry:
        """The map's geometry: one window of ``input_size`` every ``step`` pixels."""
        if tuple(size) != self.input_size:
            raise NofcError(f"the crop network runs windows of {self.input_size}, not {size}")
        window = self.input_size[1:]
        return Geometry(stride=self.step, offset=(0, 0), window=window, exact=True,
                        receptive_field=window, rf_offset=(0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wh, ww = self.input_size[1:]
        if x.shape[-2] < wh or x.shape[-1] < ww:
            raise NofcError(f"the image is {x.shape[-2]}x{x.shape[-1]}, smaller than the "
                            f"{wh}x{ww} window")
        return crop_scores(self.classifier, x, (wh, ww), self.step, batch=self.batch)


def crop_scores(model: nn.Module, x: torch.Tensor, window, step, *, batch: int,
                device=None, dtype=None) -> torch.Tensor:
    """``(B, K, h, w)``: ``model`` on every ``window`` of ``x`` ``(B, C, H, W)`` at
    ``step``, ``batch`` crops at a time (moved to ``device``/``dtype`` batch by batch);
    only one batch of crops is copied at a time.

    >>> import torch, nofc
    >>> crop_scores(nofc.zoo.LeNet5(), torch.randn(1, 1, 40, 36), (32, 32), (4, 4),
    ...             batch=8).shape
    torch.Size([1, 10, 3, 2])
    """
    (wh, ww), (sy, sx) = window, step
    b, _, H, W = x.shape
    ny, nx = (H - wh) // sy + 1, (W - ww) // sx + 1
    windows = x.unfold(2, wh, sy).unfold(3, ww, sx)  # (B, C, ny, nx, wh, ww): a view
    total = b * ny * nx
    out = None
    for start in range(0, total, batch):
        idx = torch.arange(start, min(start + batch, total), device=x.device)
        bi, i, j = idx // (ny * nx), (idx // nx) % ny, idx % nx
        crops = windows[bi, :, i, j].to(device=device or x.device, dtype=dtype or x.dtype)
        scores = call_model(model, crops)  # an error names the model and the crops
        scores = scores.reshape(scores.shape[0], -1)  # (n, K); a converted net gives 1x1
        if out is None:
            out = scores.new_empty((total, scores.shape[1]))
        out[start:start + len(idx)] = scores
    return out.reshape(b, ny, nx, -1).permute(0, 3, 1, 2)


def map_network(model: nn.Module, size, *, method: str, step=None, check: bool = True
                ) -> nn.Module:
    """The network whose output is the map: the conversion of ``model`` (``as_fcn``; for
    an ONNX model, ``.onnx`` path or ``onnx.ModelProto``, ``convert_onnx`` run in
    onnxruntime: ``nofc.onnx_net``), or a :class:`CropNet` for ``method="crops"``, or for
    ``"auto"`` where the conversion is refused (with one warning saying why and what it
    costs)."""
    if method not in METHODS:
        raise NofcError(f"method must be one of {', '.join(map(repr, METHODS))}, got "
                        f"{method!r}")
    if is_onnx(model) and not isinstance(model, OnnxNet):
        model = OnnxNet(model)
    if method == "crops" or isinstance(model, CropNet):
        return model if isinstance(model, CropNet) else _crops(model, size, step)

    def crops_instead(refusal: NofcError) -> CropNet:
        net = _crops(model, size, step)
        (wh, ww), (sy, sx) = net.input_size[1:], net.step
        overlap = (wh / sy) * (ww / sx)  # windows that read each pixel, away from the edges
        warnings.warn(f"nofc: the map is made crop by crop, one forward of the classifier per "
                      f"window every {sy}x{sx} pixels: each pixel away from the edges is read "
                      f"by about {overlap:.3g} windows, so up to about {overlap:.3g}x the work "
                      f"of one pass over the image (less on small images; a larger step costs "
                      f"less): {refusal}", stacklevel=4)
        return net

    if isinstance(model, OnnxNet):
        try:
            return model.converted(size, check=check)
        except NofcError as refusal:
            if method != "auto" or model.output_rank == 4:
                raise
            return crops_instead(refusal)
    return as_fcn(model, size, check=check, refused=crops_instead if method == "auto" else None)


def _crops(model: nn.Module, size, step) -> CropNet:
    size = check_input_size(size)
    return CropNet(model, size, size[1:] if step is None else step)
