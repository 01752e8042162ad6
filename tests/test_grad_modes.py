"""Every public function gives the same result with gradients enabled, under
``torch.no_grad()`` and under ``torch.inference_mode()``; prediction builds no autograd graph.

Two networks: LeNet5, whose geometry the walk reads layer by layer, and a small one with a
reshape into blocks (TResNet's space-to-depth stem), whose geometry is measured, with
gradients of the input, inside whatever mode the caller is in.
"""

import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import nofc
from nofc import NofcError
from nofc.zoo import LeNet5

MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad,
         "inference_mode": torch.inference_mode}
F64 = torch.float64


class _SpaceToDepth(nn.Module):
    """Each 2x2 block of pixels becomes 4 channels: a reshape the walk cannot read."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2)


def _measured_net():
    torch.manual_seed(0)
    return nn.Sequential(_SpaceToDepth(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.Conv2d(6, 5, 6)).double().eval()  # 16x16 -> 1x1, stride 2


def _lenet():
    torch.manual_seed(0)
    return LeNet5().double().eval()


NETS = {"lenet5": (_lenet, (1, 32, 32)), "measured": (_measured_net, (1, 16, 16))}


def _image(size):
    g = torch.Generator().manual_seed(1)
    return torch.randn(size[0], 2 * size[1] + 6, 3 * size[2] - 4, generator=g, dtype=F64)


def _in_every_mode(fn):
    """``fn()`` in each mode, on a network built afresh for each (no cached geometry)."""
    out = {}
    for name, mode in MODES.items():
        with mode():
            out[name] = fn()
    return out


def _same(results, equal):
    ref = results["grad"]
    for name, got in results.items():
        assert equal(got, ref), f"{name} differs from grad-enabled"


def _maps_equal(a, b):
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b)
    return a.shape == b.shape and torch.equal(a, b) and not a.requires_grad


def _fcn(net):
    """A converted network made in the current mode, with no geometry cached on it yet."""
    build, size = NETS[net]
    return nofc.convert(build(), size)


@pytest.mark.parametrize("net", NETS)
def test_geometry(net):
    build, size = NETS[net]
    results = _in_every_mode(lambda: nofc.geometry(_fcn(net), size))
    _same(results, lambda a, b: a == b)
    assert bool(results["grad"].measured) == (net == "measured")


@pytest.mark.parametrize("net", NETS)
def test_convert(net):
    build, size = NETS[net]
    x = _image(size)[None]
    fcns = _in_every_mode(lambda: nofc.convert(build(), size))
    with torch.no_grad():
        _same({k: f(x) for k, f in fcns.items()}, torch.equal)
    for name, fcn in fcns.items():  # a normal network: it trains, whatever the mode was
        assert not any(p.is_inference() for p in fcn.parameters()), name
        fcn(x).sum().backward()


@pytest.mark.parametrize("net", NETS)
@pytest.mark.filterwarnings("ignore:nofc")  # the measured net cannot dilate: it shifts
def test_dense_predict(net):
    build, size = NETS[net]
    img = _image(size)
    for step, method in ((None, "auto"), (1, "dilate"), (1, "shift")):
        _same(_in_every_mode(lambda: nofc.dense_predict(_fcn(net), img, size, step,
                                                        method=method)), _maps_equal)


@pytest.mark.parametrize("net", NETS)
def test_tiled_predict(net):
    build, size = NETS[net]
    img = _image(size).numpy()
    _same(_in_every_mode(lambda: nofc.tiled_predict(_fcn(net), img, size, tile=24,
                                                    dtype=F64, progress=False)), _maps_equal)


@pytest.mark.parametrize("net", NETS)
def test_verify(net):
    build, size = NETS[net]
    img = _image(size)
    reports = _in_every_mode(lambda: nofc.verify(build(), _fcn(net), size, image=img))
    _same(reports, lambda a, b: a == b)
    assert reports["grad"].ok and reports["grad"].exact
    _same(_in_every_mode(lambda: nofc.verify(build(), _fcn(net), size)),
          lambda a, b: a == b)


@pytest.mark.parametrize("net", NETS)
def test_explain(net):
    build, size = NETS[net]
    _same(_in_every_mode(lambda: str(nofc.explain(build(), size, at=(48, 48)))),
          lambda a, b: a == b)


def test_dilate():
    build, size = NETS["lenet5"]
    x = _image(size)[None]

    def dilated():
        with torch.no_grad():
            return nofc.dilate(_fcn("lenet5"), size, 1)(x)

    _same(_in_every_mode(dilated), _maps_equal)
    with torch.inference_mode(), pytest.raises(NofcError, match="measured"):
        nofc.dilate(_fcn("measured"), NETS["measured"][1], 1)


def test_export_onnx(tmp_path):
    pytest.importorskip("onnx")
    build, size = NETS["lenet5"]
    fcn = _fcn("lenet5").float()
    protos = {}
    for name, mode in MODES.items():
        with mode():
            protos[name] = nofc.export_onnx(fcn, tmp_path / f"{name}.onnx", input_size=size)
    _same({k: p.SerializeToString() for k, p in protos.items()}, lambda a, b: a == b)
    files = {(tmp_path / f"{k}.onnx").read_bytes() for k in MODES}
    assert len(files) == 1


@pytest.mark.parametrize("net", NETS)
@pytest.mark.filterwarnings("ignore:nofc")
def test_prediction_builds_no_autograd_graph(net):
    """With gradients enabled, no layer output of a prediction requires grad (the
    geometry, measured with gradients where it must be, is cached before the hooks)."""
    build, size = NETS[net]
    fcn = _fcn(net)
    img = _image(size)
    nofc.dense_predict(fcn, img, size)  # the geometry, cached on fcn
    graphs = []
    for m in fcn.modules():
        m.register_forward_hook(lambda m, i, o: graphs.append(type(m).__name__)
                                if isinstance(o, torch.Tensor) and o.requires_grad else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = [nofc.dense_predict(fcn, img, size),
                nofc.dense_predict(fcn, img, size, 1, method="dilate"),
                nofc.dense_predict(fcn, img, size, 1, method="shift")]
        nofc.tiled_predict(fcn, img.numpy(), size, tile=24, dtype=F64, progress=False)
        nofc.verify(build(), fcn, size, image=img)
    assert graphs == [] and not any(m.requires_grad for m in maps)


def test_network_made_in_inference_mode_is_measured_like_any_other():
    """Its tensors cannot take part in autograd: the field is measured on a copy."""
    size = NETS["measured"][1]
    with torch.inference_mode():
        net = _measured_net()
        net[1].register_buffer("unused", torch.zeros(1, dtype=F64))
        net[3].constant = torch.ones(1, dtype=F64)
    want = nofc.geometry(_measured_net(), size)
    for mode in MODES.values():
        with mode():
            assert nofc.geometry(net, size) == want
    assert all(p.is_inference() for p in net.parameters())  # the network is not changed
