"""The input layout of a large pass (nofc.layout): measured once per network and
architecture, channels-last only where faster, and the same map in either layout."""

import time

import pytest
import torch
import torchvision

import nofc
from nofc import layout, streaming
from nofc.errors import NofcError

SIZE = (3, 224, 224)


def _close(got, want, rel=1e-4):
    assert got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= rel * scale


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


@pytest.fixture(scope="module")
def fcn():
    return nofc.convert(_resnet18(), SIZE)


@pytest.fixture
def counted(monkeypatch, fcn):
    """A fresh process-wide cache and network cache, every measurement counted, and
    every pass above 1 pixel streamed in chunks of 128 pixels."""
    monkeypatch.setattr(layout, "_CHOSEN", {})
    fcn.__dict__.pop("_nofc_layout_cache", None)
    monkeypatch.setattr(streaming, "STREAM_PIXELS", 1)
    monkeypatch.setattr(streaming, "CHUNK", 128)
    calls = []
    measure = layout._measure
    monkeypatch.setattr(layout, "_measure", lambda net, x: calls.append(
        tuple(x.shape)) or measure(net, x))
    return calls


@pytest.mark.parametrize("forced, streams", [("channels_last", True), ("contiguous", True),
                                             (None, True), ("channels_last", False)])
def test_the_map_is_the_contiguous_forward_in_either_layout(monkeypatch, fcn, counted,
                                                           forced, streams):
    """resnet18 over an image streamed in chunks (or run whole, as a network that cannot
    be streamed), its input forced to each layout or measured: the plain forward's map."""
    x = torch.randn(1, 3, 320, 288)
    with torch.no_grad():
        want = fcn(x)
    if not streams:
        monkeypatch.setattr(streaming, "stages", lambda *a: None)
    if forced:
        monkeypatch.setenv(layout.LAYOUT_ENV, forced)
    seen = []
    call = streaming._call
    monkeypatch.setattr(streaming, "_call", lambda m, t, fmt: seen.append(fmt) or call(m, t, fmt))
    _close(nofc.dense_predict(fcn, x, SIZE), want)
    assert len(set(seen)) == 1 and (streams or len(seen) == 1)
    if forced:
        assert seen[0] == {"channels_last": torch.channels_last,
                           "contiguous": torch.contiguous_format}[forced]
        assert counted == []  # forced: nothing measured
    else:
        assert counted == [(1, 3, 224, 224)]  # one crop, the window's size (CHUNK < it)


def test_the_choice_is_measured_once_per_architecture(fcn, counted):
    x = torch.randn(1, 3, 256, 256)
    a = nofc.dense_predict(fcn, x, SIZE)
    nofc.dense_predict(fcn, x, SIZE)
    assert len(counted) == 1  # remembered on the network
    again = nofc.convert(_resnet18(), SIZE)  # the same architecture again
    assert layout.memory_format_for(again, x) == layout.memory_format_for(fcn, x)
    with torch.no_grad():
        for p in fcn.parameters():  # new weights: the network's cache is stale, not the
            p.mul_(-1)              # architecture's
    try:
        b = nofc.dense_predict(fcn, x, SIZE)
    finally:
        with torch.no_grad():
            for p in fcn.parameters():
                p.mul_(-1)
    assert len(counted) == 1 and not torch.allclose(a, b)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))  # another architecture: measured
    layout.memory_format_for(other, x)
    layout.memory_format_for(other, x)
    assert len(counted) == 2


def test_a_small_pass_is_not_measured_a_whole_one_is(monkeypatch, fcn, counted):
    monkeypatch.setattr(streaming, "STREAM_PIXELS", 10 ** 9)  # both run whole
    monkeypatch.setattr(streaming, "MEASURE_PIXELS", 300 * 300)
    nofc.dense_predict(fcn, torch.randn(1, 3, 256, 256), SIZE)
    assert counted == []
    nofc.dense_predict(fcn, torch.randn(1, 3, 320, 320), SIZE)  # whole, not streamed
    assert len(counted) == 1


class _Slow(torch.nn.Module):
    """Takes ``delay`` seconds in one layout, none in the other."""

    def __init__(self, slow_when_channels_last: bool, delay: float = 0.03):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.slow, self.delay = slow_when_channels_last, delay

    def forward(self, x):
        channels_last = not x.is_contiguous()
        if channels_last == self.slow:
            time.sleep(self.delay)
        return self.conv(x)


@pytest.mark.parametrize("slow_when_channels_last", [True, False])
def test_channels_last_only_where_faster(counted, slow_when_channels_last):
    net = _Slow(slow_when_channels_last)
    fmt = layout.memory_format_for(net, torch.randn(1, 3, 16, 16))
    assert fmt == (torch.contiguous_format if slow_when_channels_last
                   else torch.channels_last)


def test_a_network_that_fails_channels_last_stays_contiguous(counted):
    class Viewing(torch.nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1)[:, :4]

    assert layout.memory_format_for(Viewing(), torch.randn(1, 3, 8, 8)) == \
        torch.contiguous_format


def test_known_layouts(monkeypatch):
    cpu = torch.device("cpu")
    assert layout.known_format(cpu, torch.bfloat16) == torch.channels_last
    assert layout.known_format(cpu, torch.float64) == torch.contiguous_format
    assert layout.known_format(torch.device("meta"), torch.float32) == torch.contiguous_format
    monkeypatch.setenv(layout.LAYOUT_ENV, "contiguous")
    assert layout.known_format(cpu, torch.bfloat16) == torch.contiguous_format
    monkeypatch.setenv(layout.LAYOUT_ENV, "NHWC")
    with pytest.raises(NofcError, match="NOFC_LAYOUT='NHWC': give 'channels_last'"):
        layout.known_format(cpu, torch.float32)


def test_networks_that_state_their_own_geometry_are_not_measured(monkeypatch, counted):
    """Crop by crop (a measurement would be thousands of classifier calls), ONNX models
    and engines run as they are, whatever the image size."""
    monkeypatch.setattr(streaming, "MEASURE_PIXELS", 1)
    lenet = nofc.convert(nofc.zoo.LeNet5().eval(), (1, 32, 32))
    x = torch.randn(1, 1, 96, 80)
    want = nofc.dense_predict(lenet, x, (1, 32, 32), step=4, method="shift")
    before = len(counted)  # the converted network itself is measured
    got = nofc.dense_predict(lenet, x, (1, 32, 32), step=4, method="crops")
    assert len(counted) == before
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
