"""nofc.dilate and dense_predict(method=...): one dilated pass equals shift-and-stitch."""

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import nofc
import nofc.dense
from nofc import NofcError
from nofc.layers import DilatedPool2d, conv_output_size
from nofc.zoo import LeNet5

from test_dense import _deep_padding_free, converted

ROOT = Path(__file__).resolve().parents[1]


def _digits_net():
    spec = importlib.util.spec_from_file_location("digits_demo", ROOT / "examples" /
                                                  "digits_demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("digits_demo", mod)
    spec.loader.exec_module(mod)
    return mod.make_net()


def _avg_net():
    """Average pooling that overlaps (3, stride 2), and a global pool that conversion turns
    into a window: 1x24x24 -> 8x4x4 -> mean -> 5 classes, stride 4."""
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.AvgPool2d(3, 2), nn.Conv2d(6, 8, 3),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


class CroppedResidual(nn.Module):
    """Padding-free residual blocks: the skip path is cropped by slicing to match."""

    def __init__(self):
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 8, 3), nn.MaxPool2d(2)
        self.a, self.b = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.pool2, self.c = nn.AvgPool2d(2), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.b(torch.relu(self.a(x))) + x[:, :, 2:-2, 2:-2])
        x = self.pool2(x)
        x = self.c(x) + x[..., 1:-1, 1:-1]
        return self.fc(torch.flatten(x, 1))


NETS = {  # name: (factory, input size, stride)
    "lenet5": (LeNet5, (1, 32, 32), 4),
    "digits": (_digits_net, (1, 24, 24), 4),
    "vgg_like": (_deep_padding_free, (3, 36, 36), 8),
    "avg_pool": (_avg_net, (1, 24, 24), 4),
    "cropped_residual": (CroppedResidual, (3, 26, 26), 4),
}


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
    return converted(NETS[request.param], 3)


def test_every_step_equals_sliding_window(net):
    model, fcn, size, stride = net
    image = torch.randn(1, size[0], size[1] + stride + 5, size[2] + 2 * stride + 2,
                        dtype=torch.float64)
    for step in [d for d in range(1, stride) if stride % d == 0]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "auto" takes the dilated pass, silently
            auto = nofc.dense_predict(fcn, image, size, step)
        dilated = nofc.dense_predict(fcn, image, size, step, method="dilate")
        naive = nofc.sliding_window_predict(model, image, size, step)
        assert (auto - dilated).abs().max().item() == 0
        # a pooling that floors can leave the last pixels of the window unseen: the map
        # then has cells whose window reaches past the image; the others are the crops
        h, w = naive.shape[2:]
        assert dilated.shape[2] - h in (0, 1) and dilated.shape[3] - w in (0, 1)
        assert (dilated[..., :h, :w] - naive).abs().max().item() <= 1e-10
    shifted = nofc.dense_predict(fcn, image, size, stride // 2, method="shift")
    dilated = nofc.dense_predict(fcn, image, size, stride // 2, method="dilate")
    assert dilated.shape == shifted.shape
    assert (dilated - shifted).abs().max().item() <= 1e-10


def test_geometry_of_the_dilated_net(net):
    _, fcn, size, stride = net
    geo = nofc.geometry(fcn, size)
    assert geo.exact
    step = stride // 2
    dgeo = nofc.geometry(nofc.dilate(fcn, size, step), size)
    assert dgeo.stride == (step, step) and dgeo.exact
    assert (dgeo.window, dgeo.offset) == (geo.window, geo.offset)
    assert (dgeo.receptive_field, dgeo.rf_offset) == (geo.receptive_field, geo.rf_offset)
    hw = (size[1] + 3 * stride + 1, size[2] + stride)
    shape = geo.output_shape(hw, step=step)
    assert dgeo.output_shape(hw) == shape == tuple((hw[a] - size[1 + a]) // step + 1
                                                   for a in (0, 1))
    np.testing.assert_array_equal(dgeo.boxes(hw), geo.boxes(hw, step=step))


def test_built_once_and_shares_weights():
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    net = nofc.dilate(fcn, (1, 32, 32), 2)
    assert nofc.dilate(fcn, (1, 32, 32), (2, 2)) is net
    assert net.c5.weight is fcn.c5.weight and net.c5.dilation == (2, 2)
    assert net.s4.stride == (1, 1) and net.c3 is fcn.c3  # before the step: unchanged
    assert fcn.c5.dilation == (1, 1) and fcn.s4.stride == 2  # the original is kept
    assert "dilation x2x2" in str(net._nofc_dilation)


def test_ceil_mode_equals_shift_and_stitch():
    """Each interleaved map keeps its own partial windows: no padding, so still exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 2),
                          nn.AvgPool2d(3, 2, ceil_mode=True), nn.Flatten(),
                          nn.Linear(16, 3)).double().eval()
    fcn = nofc.convert(model, (1, 12, 12))
    image = torch.randn(1, 1, 37, 44, dtype=torch.float64)
    for step in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            auto = nofc.dense_predict(fcn, image, (1, 12, 12), step)
        shifted = nofc.dense_predict(fcn, image, (1, 12, 12), step, method="shift")
        assert auto.shape == shifted.shape
        assert (auto - shifted).abs().max().item() <= 1e-10


def test_ceil_mode_pools_after_a_removed_stride_stay_exact():
    """Found by hypothesis: NaN in 4 of 24 cells at step 1x2, where shift-and-stitch is
    finite. The dilated ceil_mode max pooling had windows that start past its input (all
    -inf), which the ceil_mode average pooling (count_include_pad=False) divided by 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MaxPool2d((1, 1), (1, 3)), nn.MaxPool2d((2, 1), 1, ceil_mode=True),
                          nn.AvgPool2d((1, 2), (1, 2), ceil_mode=True, count_include_pad=False),
                          nn.Conv2d(1, 1, 1, bias=False), nn.Conv2d(1, 1, 1, bias=False),
                          nn.Flatten(), nn.Linear(5, 1, bias=False)).double().eval()
    size = (1, 6, 6)
    fcn = nofc.convert(model, size)
    assert nofc.geometry(fcn, size).stride == (1, 6)
    for hw in [(7, 12), (9, 20), (6, 17)]:
        image = torch.randn(2, 1, *hw, dtype=torch.float64)
        for step in [(1, 1), (1, 2), (1, 3)]:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the dilated pass itself, not a fallback
                dilated = nofc.dense_predict(fcn, image, size, step, method="dilate")
            shifted = nofc.dense_predict(fcn, image, size, step, method="shift")
            assert dilated.shape == shifted.shape
            assert torch.isfinite(dilated).all(), (hw, step)
            assert (dilated - shifted).abs().max().item() <= 1e-10, (hw, step)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_dilated_ceil_pool_is_pytorch_on_every_interleaved_map(kind):
    """A map dilated by r interleaves r maps; with the stride S removed, each of them is
    pooled at S shifts. Every cell of the dilated ceil_mode pooling is PyTorch's pooling of
    one of those, and the cells they have are exactly its map: no more, no fewer."""
    x = torch.randn(1, 2, 3, 23, dtype=torch.float64)
    for r, k, s in [(1, 2, 2), (3, 1, 1), (3, 2, 1), (2, 3, 2), (3, 2, 3), (2, 1, 3), (4, 3, 2)]:
        for n in range(1, x.shape[-1] + 1):
            pool = DilatedPool2d(kind, (1, k), 1, 0, (1, r), True, False,
                                 ceil_overhang=(0, (s - 1) * r))
            want = {}
            for a in range(r):
                for b in range(s):
                    m = x[..., :n][..., a::r][..., b:]
                    if conv_output_size(m.shape[-1], k, s, ceil_mode=True) < 1:
                        continue
                    ref = (F.max_pool2d if kind == "max" else F.avg_pool2d)(
                        m, (1, k), (1, s), ceil_mode=True)
                    for i in range(ref.shape[-1]):
                        want[(b + i * s) * r + a] = ref[..., i]
            cells = pool._out(n, 1)[0]
            assert sorted(want) == list(range(cells)), (r, k, s, n)
            if not cells:
                continue
            got = pool(x[..., :n])  # (1, 2, 3, cells)
            assert got.shape[-1] == cells
            for u, ref in want.items():
                torch.testing.assert_close(got[..., u], ref, atol=1e-12, rtol=0)


def test_padded_net_auto_warns_once_and_dilate_differs_only_at_borders():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    image = torch.randn(1, 3, 128, 128)
    with pytest.warns(UserWarning, match=r"step 16x16 runs shift-and-stitch: 'conv1' \(Conv2d\) "
                                         r"pads its input.*method='dilate'") as record:
        auto = nofc.dense_predict(fcn, image, size, 16)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per network and step
        nofc.dense_predict(fcn, image, size, 16)
    shifted = nofc.dense_predict(fcn, image, size, 16, method="shift")
    dilated = nofc.dense_predict(fcn, image, size, 16, method="dilate")
    assert (auto - shifted).abs().max().item() == 0
    assert dilated.shape == shifted.shape == (1, 1000, *nofc.geometry(fcn, size).output_shape(
        (128, 128), step=16))
    assert nofc.geometry(nofc.dilate(fcn, size, 16), size).exact is False
    # both see the image's zero padding at the borders, but in different places
    assert (dilated - shifted).abs().max().item() > 1e-3


def test_fallback_for_layers_without_a_dilated_form():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.ReflectionPad2d(1),
                          nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    fcn = nofc.convert(model, (1, 10, 10))
    x = torch.randn(1, 1, 20, 20)
    with pytest.warns(UserWarning, match=r"runs shift-and-stitch: '2' \(ReflectionPad2d\) pads "
                                         "by ReflectionPad2d, which has no dilated form"):
        got = nofc.dense_predict(fcn, x, (1, 10, 10), 1, method="dilate")
    torch.testing.assert_close(got, nofc.dense_predict(fcn, x, (1, 10, 10), 1, method="shift"))
    with pytest.raises(NofcError, match="cannot dilate the network for step 1: '2'"):
        nofc.dilate(fcn, (1, 10, 10), 1)


def test_row_bands_give_the_same_map(monkeypatch):
    torch.manual_seed(1)
    model = _deep_padding_free().double()
    fcn = nofc.convert(model, (3, 36, 36))
    image = torch.randn(2, 3, 90, 61, dtype=torch.float64)
    whole = nofc.dense_predict(fcn, image, (3, 36, 36), 2, method="dilate")
    calls = []
    net = nofc.dilate(fcn, (3, 36, 36), 2)
    net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[2]))
    monkeypatch.setattr(nofc.dense, "BAND_BUDGET", 1e6)
    banded = nofc.dense_predict(fcn, image, (3, 36, 36), 2, method="dilate")
    assert len(calls) > 2 and max(calls) < image.shape[2]
    assert banded.shape == whole.shape
    assert (banded - whole).abs().max().item() <= 1e-12


@pytest.mark.parametrize("padded", [False, True])
def test_tiled_equals_whole_image(padded):
    from test_geometry import _vgg_like

    torch.manual_seed(2)
    model, size = (_vgg_like(padding=1), (3, 16, 16)) if padded else (CroppedResidual(),
                                                                      (3, 26, 26))
    fcn = nofc.convert(model.double().eval(), size)
    image = np.random.default_rng(0).standard_normal((3, 83, 70))
    whole = nofc.dense_predict(fcn, torch.from_numpy(image), size, 2, method="dilate")
    tiled = nofc.tiled_predict(fcn, image, size, tile=32, step=2, method="dilate",
                               dtype=torch.float64, progress=False)
    assert tiled.shape == tuple(whole.shape[1:])
    assert np.abs(tiled - whole[0].numpy()).max() <= 1e-10


def test_export_the_dilated_net(tmp_path):
    torch.manual_seed(4)
    size = (1, 24, 24)
    fcn = nofc.convert(_avg_net().eval(), size)
    net = nofc.dilate(fcn, size, 1)
    x = torch.randn(1, 1, 41, 37)
    with torch.no_grad():
        assert net(x).shape == (1, 5, 19, 15)  # the network itself: cells past the edges
    # every written format gives nofc's map: one cell per window inside, (41 - 24) + 1 rows
    ref = nofc.dense_predict(fcn, x, size, 1, method="dilate")
    assert ref.shape == (1, 5, 18, 14)
    scripted = nofc.to_torchscript(net)
    program = nofc.export_program(net, input_size=size).module()
    torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(program(x), ref, rtol=1e-5, atol=1e-6)
    import onnxruntime as ort

    path = tmp_path / "dilated.onnx"
    nofc.export_onnx(net, path, input_size=size)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ceil", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_dilated_pool_is_pytorch_pooling_at_dilation_one(ceil, count_include_pad):
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 3, 1), (1, 2, 0)]:
        ref = nn.AvgPool2d(k, s, p, ceil, count_include_pad)(x)
        got = DilatedPool2d("avg", k, s, p, 1, ceil, count_include_pad)(x)
        torch.testing.assert_close(got, ref)  # the same cells too
        ref = nn.MaxPool2d(k, s, p, ceil_mode=ceil)(x)
        got = DilatedPool2d("max", k, s, p, 1, ceil)(x)
        torch.testing.assert_close(got, ref)


def test_errors():
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    x = torch.randn(1, 40, 40)
    with pytest.raises(NofcError, match="method must be one of 'auto', 'dilate', 'shift'"):
        nofc.dense_predict(fcn, x, (1, 32, 32), 2, method="atrous")
    with pytest.raises(NofcError, match=r"step 3 \(y\) does not divide the network stride 4"):
        nofc.dilate(fcn, (1, 32, 32), 3)
    net = nofc.dilate(fcn, (1, 32, 32), 1)
    with pytest.raises(NofcError, match="smaller than the 32x32 window"):
        nofc.dense_predict(net, torch.randn(1, 31, 40), (1, 32, 32))
