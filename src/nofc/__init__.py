"""nofc: no fully-connected layers.

Rewrite a trained PyTorch classifier as an equivalent fully convolutional network
and run it densely over large images.

>>> import torch, torchvision, nofc
>>> fcn = nofc.convert(torchvision.models.vgg16(), input_size=(3, 224, 224))
>>> fcn(torch.randn(1, 3, 384, 384)).shape
torch.Size([1, 1000, 6, 6])
"""

from importlib import metadata as _metadata

from . import zoo
from .cohort import Cohort, predict_many
from .conversion import convert
from .dense import dense_predict, sliding_window_predict
from .dilation import dilate
from .errors import NofcError
from .explanation import Explanation, explain
from .export import export_onnx, export_program, to_torchscript
from .images import Normalize
from .layers import FullConv2d
from .onnx_import import convert_onnx, verify_onnx
from .receptive import geometry
from .sources import open_source
from .tiling import Dask, tiled_predict
from .verification import VerifyReport, verify
from .windows import Geometry

try:
    __version__ = _metadata.version("nofc")
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
    __version__ = "unknown"

__all__ = [
    # convert, prove, apply, ship
    "convert", "verify", "explain", "geometry", "dense_predict", "sliding_window_predict",
    "dilate",
    "tiled_predict", "predict_many", "to_torchscript", "export_program", "export_onnx", "convert_onnx",
    "verify_onnx",
    # the options that travel as objects: an image with its reading options, the
    # normalisation, a Dask backend
    "open_source", "Normalize", "Dask",
    # the types they return
    "Geometry", "VerifyReport", "Explanation", "FullConv2d", "NofcError", "Cohort",
    "zoo", "__version__",
]
