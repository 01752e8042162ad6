"""Cross-check against timm, whose VGG already holds fc6/fc7 as convolutions (ConvMlp)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import nofc

timm = pytest.importorskip("timm")
from timm.models.vgg import _filter_fn  # noqa: E402 - timm's torchvision -> timm mapping


def test_vgg16_dense_map_matches_timm():
    torch.manual_seed(0)
    tv = torchvision.models.vgg16().eval()
    tm = timm.create_model("vgg16", pretrained=False).eval()
    # timm's own checkpoint filter: classifier.0/3/6 -> pre_logits.fc1/fc2, head.fc with
    # fc6 reshaped to (4096, 512, 7, 7) and fc7 to (4096, 4096, 1, 1)
    tm.load_state_dict(_filter_fn(tv.state_dict()))
    fcn = nofc.convert(tv, input_size=(3, 224, 224))
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ours = fcn(x)  # (1, 1000, 8, 8)
        pre = tm.pre_logits(tm.forward_features(x))  # (1, 4096, 8, 8)
        fc = tm.head.fc
        theirs = F.conv2d(pre, fc.weight[:, :, None, None], fc.bias)  # head.fc as 1x1 conv
        pooled = tm(x)  # timm's default head averages the map before its Linear
    assert ours.shape == theirs.shape == (1, 1000, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    # by linearity, timm's global-average head is the mean of the dense map
    torch.testing.assert_close(pooled, theirs.mean(dim=(2, 3)), rtol=0,
                               atol=1e-4 * pooled.abs().max().item())
