"""dense_predict and sliding_window_predict: every map cell against its crop."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import nofc
from nofc import NofcError
from nofc.zoo import LeNet5

from conftest import state_hash

CUDA = torch.cuda.is_available()


def _deep_padding_free():
    """VGG-like, no padding, BatchNorm: 3x36x36 -> 64x2x2 -> 7 classes, stride 8."""
    layers, c = [], 3
    for out, n in ((16, 2), (32, 2), (64, 1)):
        for _ in range(n):
            layers += [nn.Conv2d(c, out, 3), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        layers += [nn.MaxPool2d(2)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 2 * 2, 24), nn.ReLU(),
                          nn.Linear(24, 7))
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


NETS = {"lenet5": (LeNet5, (1, 32, 32), 4), "vgg_like": (_deep_padding_free, (3, 36, 36), 8)}


def converted(spec, seed: int):
    """(float64 model, its conversion, input size, stride) for a (factory, size, stride)."""
    torch.manual_seed(seed)
    make, size, stride = spec
    model = make().double().eval()
    return model, nofc.convert(model, size), size, stride


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
    return converted(NETS[request.param], 1)


def _crops_at(image, boxes):
    """Cut every box out of a (C, H, W) image: (h*w, C, wh, ww), one slice per cell."""
    return torch.stack([image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes.reshape(-1, 4)])


def test_every_cell_is_the_classifier_on_its_crop(net):
    model, fcn, size, stride = net
    geo = nofc.geometry(fcn, size)
    assert geo.exact and geo.stride == (stride, stride)
    image = torch.randn(size[0], 2 * size[1] + 13, 3 * size[2] - 5, dtype=torch.float64)
    dense = nofc.dense_predict(fcn, image, size)  # (1, K, h, w)
    boxes = geo.boxes(image.shape[1:])
    assert dense.shape[2:] == boxes.shape[:2] == geo.output_shape(image.shape[1:])
    assert (boxes[..., 2] <= image.shape[1]).all() and (boxes[..., 3] <= image.shape[2]).all()
    with torch.no_grad():
        expect = model(_crops_at(image, boxes))  # (h*w, K)
    got = dense[0].flatten(1).T  # (h*w, K), cells in row-major order like the boxes
    assert got.shape == expect.shape
    assert (got - expect).abs().max().item() <= 1e-10


@pytest.mark.parametrize("divisor", [2, 4])
def test_shift_and_stitch_equals_sliding_window(net, divisor):
    model, fcn, size, stride = net
    step = stride // divisor
    image = torch.randn(2, size[0], size[1] + 23, size[2] + 2 * stride + 3, dtype=torch.float64)
    dense = nofc.dense_predict(fcn, image, size, step=step)
    naive = nofc.sliding_window_predict(model, image, size, step=step, batch_size=50)
    assert dense.shape == naive.shape
    assert dense.shape[2] == (image.shape[2] - size[1]) // step + 1
    assert (dense - naive).abs().max().item() <= 1e-10


def test_step_per_axis_and_stride_step(net):
    model, fcn, size, stride = net
    image = torch.randn(size[0], size[1] + 2 * stride + 1, size[2] + stride, dtype=torch.float64)
    for step in [(stride, stride // 2), stride, None]:
        dense = nofc.dense_predict(fcn, image, size, step=step)
        naive = nofc.sliding_window_predict(model, image, size, step=step or stride)
        torch.testing.assert_close(dense, naive, rtol=0, atol=1e-10)


def test_batches_numpy_and_float32():
    torch.manual_seed(2)
    model = LeNet5().eval()
    fcn = nofc.convert(model, (1, 32, 32))
    images = torch.randn(3, 1, 45, 50)
    full = nofc.dense_predict(fcn, images, (1, 32, 32), dtype=torch.float64)
    one = nofc.dense_predict(fcn, images, (1, 32, 32), batch_size=1)  # float32
    torch.testing.assert_close(one.double(), full, rtol=1e-4, atol=1e-5)
    from_np = nofc.dense_predict(fcn, images[1].numpy(), (1, 32, 32), dtype=torch.float64)
    torch.testing.assert_close(from_np[0], full[1], rtol=0, atol=0)
    # a classifier that was not converted yet is converted on the fly
    direct = nofc.dense_predict(model, images, (1, 32, 32), dtype=torch.float64)
    torch.testing.assert_close(direct, full, rtol=0, atol=1e-12)


def test_models_are_not_modified():
    model = LeNet5().eval()
    fcn = nofc.convert(model, (1, 32, 32))
    before = state_hash(model), state_hash(fcn)
    x = torch.randn(1, 40, 40)
    nofc.dense_predict(fcn, x, (1, 32, 32), step=2, dtype=torch.float64, device="cpu")
    nofc.sliding_window_predict(model, x, (1, 32, 32), step=3, dtype=torch.float64)
    assert (state_hash(model), state_hash(fcn)) == before
    assert next(fcn.parameters()).dtype == torch.float32


def test_padded_net_reports_the_measured_difference():
    model = torchvision.models.resnet18().eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    assert geo.exact is False
    image = torch.randn(3, 128, 160)
    report = nofc.verify(model, fcn, size, image=image)
    assert report.exact is False and report.cells == 3 * 4
    assert report.max_rel_error > 1e-3  # padding: the cells really differ from the crops
    assert "NOT EXACT" in str(report) and "pads" in str(report)
    # the reference-size check without image= is unchanged
    assert nofc.verify(model, fcn, size).ok


def test_shifted_pass_with_no_pixels_left():
    """A padded net on an image the size of its window, at half its stride: the shifted
    pass has no rows left, and the pooling's padding must not make it promise a cell
    (shift-and-stitch ran the network on an empty image; the dilated pass gave 2x2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1, stride=8), nn.MaxPool2d(2, 2, padding=1),
                          nn.Flatten(), nn.Linear(2, 3)).double().eval()
    fcn = nofc.convert(model, (1, 8, 8))
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert nofc.geometry(fcn, (1, 8, 8)).output_shape((8, 8), step=8) == (1, 1)
    with torch.no_grad():
        ref = model(x)  # (1, 3)
    for method in ("shift", "dilate"):
        out = nofc.dense_predict(fcn, x, (1, 8, 8), 8, method=method)
        assert out.shape == (1, 3, 1, 1)
        torch.testing.assert_close(out[..., 0, 0], ref, atol=1e-10, rtol=0)


def test_verify_image_exact_net():
    model = LeNet5().eval()
    fcn = nofc.convert(model, (1, 32, 32))
    report = nofc.verify(model, fcn, (1, 32, 32), image=torch.randn(2, 1, 41, 47))
    assert report.ok and report.exact is True and report.cells == 2 * 3 * 4
    assert report.max_abs_error <= 1e-10


def test_errors():
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    x = torch.randn(1, 40, 40)
    with pytest.raises(NofcError, match=r"step 3 \(y\) does not divide the network stride 4: "
                                        r"steps that work are 1, 2, 4"):
        nofc.dense_predict(fcn, x, (1, 32, 32), step=3)
    with pytest.raises(NofcError, match="positive integer"):
        nofc.dense_predict(fcn, x, (1, 32, 32), step=0)
    with pytest.raises(NofcError, match="smaller than the 32x32 window"):
        nofc.dense_predict(fcn, torch.randn(1, 31, 40), (1, 32, 32))
    with pytest.raises(NofcError, match="smaller than the 32x32 window"):
        nofc.sliding_window_predict(LeNet5(), torch.randn(1, 40, 20), (1, 32, 32))
    with pytest.raises(NofcError, match="3 channels, the network expects 1"):
        nofc.dense_predict(fcn, torch.randn(3, 40, 40), (1, 32, 32))
    with pytest.raises(NofcError, match=r"\(C, H, W\) or \(B, C, H, W\)"):
        nofc.dense_predict(fcn, torch.randn(40, 40), (1, 32, 32))
    with pytest.raises(NofcError, match="converted for input_size"):
        nofc.dense_predict(fcn, x, (1, 36, 36))
    with pytest.raises(NofcError, match="batch_size"):
        nofc.dense_predict(fcn, x, (1, 32, 32), batch_size=0)
    with pytest.raises(NofcError, match="torch.Tensor or numpy"):
        nofc.dense_predict(fcn, [[1.0]], (1, 32, 32))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_matches_cpu():
    model = _deep_padding_free().double()
    size = (3, 36, 36)
    fcn = nofc.convert(model, size)
    image = torch.randn(2, 3, 70, 81, dtype=torch.float64)
    cpu = nofc.dense_predict(fcn, image, size, step=4)
    gpu = nofc.dense_predict(fcn, image, size, step=4, device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)
    naive = nofc.sliding_window_predict(model, image, size, step=4, device="cuda")
    torch.testing.assert_close(naive.cpu(), cpu, rtol=0, atol=1e-10)
    assert np.isfinite(gpu.cpu().numpy()).all()
