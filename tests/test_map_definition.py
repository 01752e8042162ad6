"""One definition of a map's cells (issue 21): one cell per window wholly inside the image,
the shape crop by crop gives, for every kind of network and every way through; and
``edges`` "zeros"/"reflect", which pad the image so that windows cover every pixel."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import nofc
from nofc.zoo import LeNet5

F64 = torch.float64


def _inside(hw, window, step):
    """Written here, apart from nofc: windows wholly inside, ``step`` apart."""
    return tuple(max((hw[a] - window[a]) // step[a] + 1, 0) for a in (0, 1))


def _covering(hw, window, step):
    """Windows that cover every pixel: ceil((H - window) / step) + 1 per axis."""
    return tuple(max(-(-(hw[a] - window[a]) // step[a]), 0) + 1 for a in (0, 1))


class FloorPool(nn.Module):
    """Padding-free; a max-pool's floor drops the last rows: window 22x18, field 20x16."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 5)  # 22x18 -> 18x14
        self.pool = nn.MaxPool2d(4)  # -> 4x3 (the last 2 rows and columns are dropped)
        self.fc = nn.Linear(3 * 4 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def test_field_smaller_than_window_gives_the_sliding_window_shape():
    model = FloorPool().double().eval()
    size = (1, 22, 18)
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    assert geo.receptive_field == (20, 16) and geo.exact
    x = torch.randn(1, 1, 70, 61, dtype=F64)
    ref = nofc.sliding_window_predict(model, x, size, step=1)
    assert ref.shape[2:] == (49, 44) == _inside((70, 61), size[1:], (1, 1))
    for method in ("dilate", "shift"):
        got = nofc.dense_predict(fcn, x, size, step=1, method=method)
        assert got.shape == ref.shape, method
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    tiled = nofc.tiled_predict(fcn, x[0].numpy(), size, tile=24, step=1, progress=False,
                               dtype=F64)
    np.testing.assert_allclose(tiled, ref[0].numpy(), rtol=0, atol=1e-10)
    b = geo.boxes((70, 61), step=1)
    assert b.shape[:2] == (49, 44) and b[..., 2].max() <= 70 and b[..., 3].max() <= 61


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_0",
                                  pytest.param("mnasnet0_5", marks=pytest.mark.slow)])
def test_padded_networks_have_no_cells_past_the_edges(name):
    """The network itself gives cells for windows past the bottom and right edges (its
    zero padding); the map does not."""
    model = torchvision.models.get_model(name, weights=None, num_classes=4).eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    hw = (64 + 2 * 32 + 7, 64 + 32 + 19)  # window + 2 strides + 7, non-square
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        natural = fcn(x).shape[2:]
    want = _inside(hw, size[1:], geo.stride)
    assert tuple(natural) != want  # this image does show the difference
    assert nofc.dense_predict(fcn, x, size).shape[2:] == want
    assert nofc.sliding_window_predict(model, x, size, step=geo.stride).shape[2:] == want
    assert nofc.tiled_predict(fcn, x[0].numpy(), size, tile=64, progress=False).shape[1:] \
        == want
    step = geo.stride[0] // 2
    assert nofc.dense_predict(fcn, x, size, step=step, method="shift").shape[2:] == \
        _inside(hw, size[1:], (step, step))
    assert geo.boxes(hw)[-1, -1, 2:].tolist() <= list(hw)


def test_streamed_pass_is_cropped_too():
    from nofc.streaming import STREAM_PIXELS

    model = torchvision.models.resnet18(num_classes=3).eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    side = int(STREAM_PIXELS ** 0.5) + 45
    x = torch.randn(1, 3, side, side + 13)
    got = nofc.dense_predict(fcn, x, size)
    assert got.shape[2:] == _inside((side, side + 13), (64, 64), (32, 32))


@pytest.mark.parametrize("edges", ["zeros", "reflect"])
def test_edges_pad_every_pixel_into_a_window_symmetrically(edges):
    model = LeNet5().double().eval()
    size = (1, 32, 32)
    fcn = nofc.convert(model, size)
    hw = (70, 61)
    x = torch.randn(1, 1, *hw, dtype=F64)
    geo = nofc.geometry(fcn, size).with_edges(hw, edges)
    top, bottom, left, right = geo.padding(hw)
    assert (top, bottom, left, right) == (1, 1, 1, 2)
    got = nofc.dense_predict(fcn, x, size, edges=edges)
    assert got.shape[2:] == _covering(hw, (32, 32), (4, 4)) == geo.output_shape(hw) == (11, 9)
    # the reference: the classifier on crops of the image padded by torch itself
    mode = "constant" if edges == "zeros" else "reflect"
    padded = F.pad(x, (left, right, top, bottom), mode=mode)
    ref = nofc.sliding_window_predict(model, padded, size, step=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    b = geo.boxes(hw)
    assert b[0, 0, :2].tolist() == [-top, -left]
    assert b[-1, -1, 2:].tolist() == [hw[0] + bottom, hw[1] + right]
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1
    covered = np.zeros(hw, bool)
    for y0, x0, y1, x1 in b.reshape(-1, 4):
        covered[max(y0, 0):y1, max(x0, 0):x1] = True
    assert covered.all()
    tiled = nofc.tiled_predict(fcn, x[0, 0].numpy(), size, tile=32, progress=False, dtype=F64,
                               edges=edges)
    np.testing.assert_allclose(tiled, got[0].numpy(), rtol=0, atol=1e-10)
    fine = nofc.dense_predict(fcn, x, size, step=2, edges=edges)
    assert fine.shape[2:] == _covering(hw, (32, 32), (2, 2))


def test_edges_on_an_image_smaller_than_the_window():
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    got = nofc.dense_predict(fcn, torch.randn(1, 20, 40), (1, 32, 32), edges="zeros")
    assert got.shape[2:] == (1, 3)
    with pytest.raises(nofc.NofcError, match="edges='reflect' cannot pad a 10x40"):
        nofc.dense_predict(fcn, torch.randn(1, 10, 40), (1, 32, 32), edges="reflect")
    with pytest.raises(nofc.NofcError, match="smaller than the 32x32 window"):
        nofc.dense_predict(fcn, torch.randn(1, 20, 40), (1, 32, 32))
    with pytest.raises(nofc.NofcError, match="edges must be one of 'inside', 'zeros'"):
        nofc.dense_predict(fcn, torch.randn(1, 40, 40), (1, 32, 32), edges="pad")


def test_a_tiled_store_with_other_edges_is_refused(tmp_path):
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    img = np.random.default_rng(0).random((90, 75)).astype(np.float32)
    out = tmp_path / "m.zarr"
    nofc.tiled_predict(fcn, img, (1, 32, 32), tile=32, out=out, progress=False)
    with pytest.raises(nofc.NofcError, match="edges"):
        nofc.tiled_predict(fcn, img, (1, 32, 32), tile=32, out=out, progress=False,
                           edges="zeros")


def test_cli_heatmap_edges_boxes_reach_into_the_padding(tmp_path, capsys):
    import PIL.Image

    from nofc.cli import main

    img = tmp_path / "page.png"
    PIL.Image.fromarray((np.random.default_rng(1).random((70, 61)) * 255).astype(np.uint8)
                        ).save(img)
    scores = tmp_path / "s.npz"
    assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "--edges",
                 "zeros", "-o", str(tmp_path / "h.png"), "--scores", str(scores)]) == 0
    z = np.load(scores)
    assert z["scores"].shape == (10, 11, 9) and z["boxes"].shape == (11, 9, 4)
    assert z["boxes"][0, 0].tolist() == [-1, -1, 31, 31]
    assert z["boxes"][-1, -1].tolist() == [39, 31, 71, 63]
    assert z["offset"].tolist() == [-1, -1]
    assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "--edges",
                 "mirror", "-o", str(tmp_path / "g.png")]) == 2
    assert "invalid choice: 'mirror'" in capsys.readouterr().err


class SamePadded(nn.Module):
    """TensorFlow "same" padding computed from the input size (timm's Conv2dSame: DaViT's
    and the tf_ EfficientNets' kind), with global context: cells see the padding."""

    def __init__(self):
        super().__init__()
        from timm.layers import Conv2dSame

        self.conv = Conv2dSame(1, 4, 3, stride=2)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def features(self, x):
        x = self.conv(x)
        x = x + x.mean((2, 3), keepdim=True)  # global context
        return F.relu(self.conv2(x))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_fixed_pads_make_a_lattice_network_equal_to_the_original_on_what_it_runs():
    """convert fixes the pad at the reference size's amounts: off the lattice (an odd
    image) the original would pad otherwise, so nofc runs the largest window + k strides
    inside the image, where the converted network is the original, bit for bit."""
    torch.manual_seed(0)
    model = SamePadded().double().eval()
    size = (1, 16, 16)
    fcn = nofc.convert(model, size)
    assert any(r.kind == "fixed_pad" for r in fcn._nofc_record.plan.replacements)
    geo = nofc.geometry(fcn, size)
    assert geo.lattice and geo.stride == (2, 2)
    x = torch.randn(1, 1, 16 + 2 * 3 + 1, 16 + 2 * 4 + 1, dtype=F64)  # 23 x 25: odd
    got = nofc.dense_predict(fcn, x, size)
    assert got.shape[2:] == _inside(x.shape[2:], (16, 16), (2, 2)) == (4, 5)
    h, w = geo.fit(x.shape[2:])
    assert (h, w) == (22, 24)
    # the original's features on the image it ran on, each window's part through its head
    with torch.no_grad():
        feats = model.features(x[..., :h, :w])
        ref = torch.stack([torch.stack([
            model.fc(feats[..., i:i + 6, j:j + 6].mean((2, 3)))[0]
            for j in range(5)], -1) for i in range(4)], -2)
    torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-10)
