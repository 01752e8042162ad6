"""Property tests: random CNN classifiers convert into equivalent fully convolutional nets.

Hypothesis draws small but varied classifiers (conv/pool blocks with random kernel, stride,
padding, dilation, groups, ceil_mode, BatchNorm and activations, some in place; writes in
place whose result the forward ignores: a gain, a residual branch, a channel slice, a crop;
a flatten or one of three global-pooling spellings; 1 to 3 Linear layers with
BatchNorm1d/Dropout/in-place gains between) and checks:

* ``nofc.verify`` at the reference size: float64 within 1e-10, float32 within 1e-4 relative;
* when the geometry is exact, every cell of the map on a larger input equals the classifier
  run on the crop that cell stands for (float64, 1e-10);
* at a drawn step dividing the stride, the dilated network's map (``method="dilate"``) has
  shift-and-stitch's shape, and without padding its values (float64, 1e-10);
* the user's model is not touched.

Profiles: the default run draws 300 architectures; ``pytest --slow`` or
``HYPOTHESIS_PROFILE=slow`` draws 3000. A failure shrinks to a minimal architecture, printed
as the ``model=`` line of the falsifying example.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import nofc
from nofc._fx import ANY_STRIDE

from conftest import state_hash

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nofc-default", max_examples=150, **_COMMON)
settings.register_profile("nofc-slow", max_examples=3000, **_COMMON)
_PROFILE = "nofc-slow" if os.environ.get("HYPOTHESIS_PROFILE") == "slow" else "nofc-default"

_MAX_STRIDE = 16  # cap on the cumulative stride per axis, so the larger input stays small
_ACTIVATIONS = {
    "ReLU": nn.ReLU, "LeakyReLU": lambda: nn.LeakyReLU(0.1), "Tanh": nn.Tanh, "GELU": nn.GELU,
    "SiLU": nn.SiLU, "Hardswish": nn.Hardswish, "ELU": nn.ELU,
    "ReLU(inplace=True)": lambda: nn.ReLU(inplace=True),
}
# writes into the map whose result the forward does not read (timm's NormFreeBlock skipinit,
# in-place residuals, slices); see InPlace
_IN_PLACE = ("x.mul_(gain)", "x.add_(conv(x))", "x[:, :1] *= gain", "x[:, :, 1:].mul_(gain)",
             "F.relu(x, inplace=True)")
_GLOBAL_SPELLINGS = ("AdaptiveAvgPool2d(1)", "F.adaptive_avg_pool2d(x, 1)", "x.mean((2, 3))")
_FLATTEN_SPELLINGS = ("nn.Flatten()", "torch.flatten(x, 1)", "x.view(x.size(0), -1)")


# --------------------------------------------------------------------------- architecture


@dataclass
class Arch:
    """A drawn architecture as plain data; ``build()`` turns it into a model."""

    input_size: tuple[int, int, int]
    body: list[tuple[str, dict]] = field(default_factory=list)  # (kind, params)
    reduce: str = "nn.Flatten()"
    head: list[tuple[str, dict]] = field(default_factory=list)
    stride: tuple[int, int] = (1, 1)  # cumulative stride of the body
    exact: bool = True  # own rule: no padding, no ceil_mode (until nofc.geometry lands)
    seed: int = 0

    def __repr__(self) -> str:
        lines = [f"Arch(input_size={self.input_size}, seed={self.seed}, stride={self.stride})"]
        lines += [f"  {kind}({_kw(p)})" for kind, p in self.body]
        lines.append(f"  {self.reduce}")
        lines += [f"  {kind}({_kw(p)})" for kind, p in self.head]
        return "\n".join(lines)


def _kw(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _out(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    """PyTorch's output length for a conv/pool window (ceil_mode rule included)."""
    span = size + 2 * p - d * (k - 1) - 1
    n = (-(-span // s) if ceil else span // s) + 1
    if ceil and (n - 1) * s >= size + p:  # the last window must start inside the input
        n -= 1
    return n


class RandomCNN(nn.Module):
    """The model an ``Arch`` describes; its repr is the architecture."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        torch.manual_seed(arch.seed)
        self.body = nn.Sequential(*[_make(k, p) for k, p in arch.body])
        self.flatten = nn.Flatten()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(*[_make(k, p) for k, p in arch.head])
        with torch.no_grad():  # BatchNorm with statistics that are not the identity
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        x = self.body(x)  # (B, C, h, w)
        r = self.arch.reduce
        if r == "nn.Flatten()":
            x = self.flatten(x)
        elif r == "torch.flatten(x, 1)":
            x = torch.flatten(x, 1)
        elif r == "x.view(x.size(0), -1)":
            x = x.view(x.size(0), -1)
        elif r == "AdaptiveAvgPool2d(1)":
            x = self.flatten(self.gap(x))
        elif r == "F.adaptive_avg_pool2d(x, 1)":
            x = F.adaptive_avg_pool2d(x, 1)
            x = x.view(x.size(0), -1)
        else:
            x = x.mean((2, 3))
        return self.head(x)  # (B, K)

    def __repr__(self) -> str:
        return repr(self.arch)


class InPlace(nn.Module):
    """An in-place write into its input, whose result is not read; returns the input.

    ``x.add_(conv(x))`` is a residual branch (``kernel`` 1 or 3, padded to keep the size);
    ``x[:, :, 1:]`` writes into a crop of the map, so the map of a larger image is not the
    classifier on crops (geometry must not call it exact, unless the crop does not count).
    """

    def __init__(self, how: str, channels: int, kernel: int = 1):
        super().__init__()
        self.how = how
        self.gain = nn.Parameter(torch.empty(()).uniform_(1.5, 2.5))
        self.conv = (nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
                     if how == "x.add_(conv(x))" else None)

    def forward(self, x):
        if self.how == "x.mul_(gain)":
            x.mul_(self.gain)
        elif self.how == "x.add_(conv(x))":
            x.add_(self.conv(x))
        elif self.how == "x[:, :1] *= gain":
            x[:, :1] *= self.gain
        elif self.how == "x[:, :, 1:].mul_(gain)":
            x[:, :, 1:].mul_(self.gain)
        else:
            F.relu(x, inplace=True)
        return x


def _make(kind: str, p: dict) -> nn.Module:
    if kind == "InPlace":
        return InPlace(**p)
    if kind == "Conv2d":
        return nn.Conv2d(**p)
    if kind == "MaxPool2d":
        return nn.MaxPool2d(**p)
    if kind == "AvgPool2d":
        return nn.AvgPool2d(**p)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(**p)
    if kind == "BatchNorm1d":
        return nn.BatchNorm1d(**p)
    if kind == "Dropout":
        return nn.Dropout(**p)
    if kind == "Linear":
        return nn.Linear(**p)
    return _ACTIVATIONS[kind]()


def _window(draw, size: int, *, dilate: bool, pool: bool):
    """(kernel, dilation, padding) valid on an axis of ``size``."""
    d = draw(st.integers(1, 2)) if dilate else 1
    k = draw(st.integers(1, min(5 if not pool else 3, (size - 1) // d + 1)))
    p = draw(st.integers(0, ((k - 1) * d + 1) // 2 if not pool else k // 2))
    return k, d, p


@st.composite
def architectures(draw) -> Arch:
    """Small valid CNN classifiers; shapes are tracked while drawing."""
    c = draw(st.integers(1, 3))
    h, w = draw(st.integers(6, 28)), draw(st.integers(6, 28))
    arch = Arch(input_size=(c, h, w), seed=draw(st.integers(0, 2**16)))
    sh, sw = 1, 1
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["Conv2d", "Conv2d", "MaxPool2d", "AvgPool2d"]))
        pool = kind != "Conv2d"
        (kh, dh, ph) = _window(draw, h, dilate=kind != "AvgPool2d", pool=pool)
        (kw, dw, pw) = _window(draw, w, dilate=kind != "AvgPool2d", pool=pool)
        if pool:  # one dilation, padding per layer keeps the draw simple
            dw, pw = dh, min(ph, kw // 2)
            ph = min(ph, kh // 2)
        s_h = draw(st.integers(1, max(1, min(3, _MAX_STRIDE // sh))))
        s_w = draw(st.integers(1, max(1, min(3, _MAX_STRIDE // sw))))
        ceil = draw(st.booleans()) if pool else False
        if kind == "Conv2d":
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
            out_c = groups * draw(st.integers(1, 3))
            params = dict(in_channels=c, out_channels=out_c, kernel_size=(kh, kw),
                          stride=(s_h, s_w), padding=(ph, pw), dilation=(dh, dw),
                          groups=groups, bias=draw(st.booleans()))
        elif kind == "MaxPool2d":
            params = dict(kernel_size=(kh, kw), stride=(s_h, s_w), padding=(ph, pw),
                          dilation=dh, ceil_mode=ceil)
            dw = dh
        else:
            params = dict(kernel_size=(kh, kw), stride=(s_h, s_w), padding=(ph, pw),
                          ceil_mode=ceil, count_include_pad=draw(st.booleans()))
        nh = _out(h, kh, s_h, ph, dh, ceil)
        nw = _out(w, kw, s_w, pw, dw, ceil)
        if nh < 1 or nw < 1:
            continue
        arch.body.append((kind, params))
        arch.exact = arch.exact and ph == pw == 0 and not ceil
        h, w, sh, sw = nh, nw, sh * s_h, sw * s_w
        if kind == "Conv2d":
            c = params["out_channels"]
            if draw(st.booleans()):
                arch.body.append(("BatchNorm2d", dict(num_features=c)))
            act = draw(st.sampled_from([None, *_ACTIVATIONS]))
            if act:
                arch.body.append((act, {}))
            how = draw(st.sampled_from([None] * 5 + list(_IN_PLACE)))  # one block in two
            if how is not None:
                params = dict(how=how, channels=c)
                if how == "x.add_(conv(x))":
                    params["kernel"] = draw(st.sampled_from([1, 3]))
                    arch.exact = arch.exact and params["kernel"] == 1
                arch.exact = arch.exact and how != "x[:, :, 1:].mul_(gain)"
                arch.body.append(("InPlace", params))
    arch.stride = (sh, sw)
    # a write into a crop, or a padded branch written in place, is read from the graph only
    # as "measure the geometry", and measuring finds strides that divide ANY_STRIDE
    assume(not any(k == "InPlace" and (p["how"] == "x[:, :, 1:].mul_(gain)"
                                       or p.get("kernel", 1) > 1) for k, p in arch.body)
           or all(ANY_STRIDE % s == 0 for s in arch.stride))
    arch.reduce = draw(st.sampled_from(_FLATTEN_SPELLINGS + _GLOBAL_SPELLINGS))
    n = c * h * w if arch.reduce in _FLATTEN_SPELLINGS else c
    if draw(st.booleans()):
        arch.head.append(("Dropout", dict(p=0.5)))
    n_linear = draw(st.integers(1, 3))
    for i in range(n_linear):
        out = draw(st.integers(1, 5)) if i == n_linear - 1 else draw(st.integers(1, 12))
        arch.head.append(("Linear", dict(in_features=n, out_features=out,
                                         bias=draw(st.booleans()))))
        n = out
        if i < n_linear - 1:
            if draw(st.booleans()):
                arch.head.append(("BatchNorm1d", dict(num_features=n)))
            act = draw(st.sampled_from([None, "ReLU", "Tanh", "ReLU(inplace=True)"]))
            if act:
                arch.head.append((act, {}))
            if draw(st.integers(0, 3)) == 0:  # on the flattened vector
                arch.head.append(("InPlace", dict(how="x.mul_(gain)", channels=n)))
            if draw(st.booleans()):
                arch.head.append(("Dropout", dict(p=0.3)))
    return arch


@st.composite
def models(draw) -> RandomCNN:
    arch = draw(architectures())
    with torch.random.fork_rng():
        return RandomCNN(arch)


# --------------------------------------------------------------------------- the property


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is twice as fast as two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _geometry(model: RandomCNN, fcn):
    """(stride, offset, exact) of the map: nofc.geometry's answer, cross-checked."""
    arch = model.arch
    geometry = getattr(nofc, "geometry", None)
    if not callable(geometry):  # before nofc.geometry existed: no padding, no ceil_mode
        return arch.stride, (0, 0), arch.exact
    geo = geometry(fcn, input_size=arch.input_size)
    assert geo.stride == arch.stride, geo
    assert geo.window == arch.input_size[1:], geo
    if arch.exact:  # geometry may find more exact cases (a ceil_mode that never rounds up)
        assert geo.exact, geo
    return geo.stride, geo.offset, geo.exact


@settings(settings.get_profile(_PROFILE))
@given(model=models(), extra=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       divisor=st.one_of(st.none(), st.none(), st.none(),  # a step in one draw of four
                         st.tuples(st.integers(1, 16), st.integers(1, 16))))
def test_random_classifier_converts_exactly(model, extra, divisor):
    note(repr(model.arch))
    _check(model, extra, divisor)


# Minimal architectures that hypothesis found failing once, kept as regression tests:
# name -> (architecture, extra, divisor), the arguments of the falsifying example (a
# divisor draws a step finer than the stride, which runs the dilated pass).
_FOUND = {
    # geometry said 0 cells: a ceil_mode pooling window longer than its 3-wide input
    "ceil-window-longer-than-input": (Arch(
        input_size=(1, 6, 6), stride=(1, 6), exact=False,
        body=[("Conv2d", dict(in_channels=1, out_channels=1, kernel_size=(1, 1), bias=False)),
              ("MaxPool2d", dict(kernel_size=(1, 1), stride=(1, 2))),
              ("MaxPool2d", dict(kernel_size=(1, 3), stride=(1, 3), dilation=2,
                                 ceil_mode=True))],
        head=[("Linear", dict(in_features=6, out_features=1, bias=False))]), (1, 1), None),
    # NaN in 4 of 24 cells at step 1x2: the dilated ceil_mode max pooling made windows that
    # start past the input (-inf), which the ceil_mode average pooling then divided by 0
    "dilated-ceil-windows-past-the-input": (Arch(
        input_size=(1, 6, 6), stride=(1, 6), exact=False,
        body=[("MaxPool2d", dict(kernel_size=(1, 1), stride=(1, 3))),
              ("MaxPool2d", dict(kernel_size=(2, 1), stride=(1, 1), ceil_mode=True)),
              ("AvgPool2d", dict(kernel_size=(1, 2), stride=(1, 2), ceil_mode=True,
                                 count_include_pad=False)),
              ("Conv2d", dict(in_channels=1, out_channels=1, kernel_size=(1, 1), bias=False)),
              ("Conv2d", dict(in_channels=1, out_channels=1, kernel_size=(1, 1), bias=False))],
        head=[("Linear", dict(in_features=5, out_features=1, bias=False))]), (1, 1), (1, 3)),
}


@pytest.mark.parametrize("name", list(_FOUND))
def test_found_by_hypothesis(name):
    arch, extra, divisor = _FOUND[name]
    model = RandomCNN(arch)
    _check(model, extra, divisor)
    if divisor is not None:  # the step ran the dilated pass, not a fallback
        size = arch.input_size
        fcn = nofc.convert(model, input_size=size)
        nofc.dilate(fcn, size, _step(nofc.geometry(fcn, size).stride, divisor))


def _check(model: RandomCNN, extra: tuple[int, int], divisor=None) -> None:
    """The property: equivalence at the reference size and on the crops of a larger input."""
    arch = model.arch
    size = arch.input_size
    before = state_hash(model)

    fcn = nofc.convert(model, input_size=size)
    assert not any(isinstance(m, nn.Linear) for m in fcn.modules())
    r64 = nofc.verify(model, fcn, input_size=size, dtype=torch.float64)
    assert r64.ok and r64.max_abs_error <= 1e-10, r64
    r32 = nofc.verify(model, fcn, input_size=size, dtype=torch.float32)
    assert r32.ok and r32.max_rel_error <= 1e-4, r32

    # a larger input: (extra rows, extra columns) of map cells beyond the reference one
    (sh, sw), (oy, ox), exact = _geometry(model, fcn)
    c, h, w = size
    big = torch.randn(2, c, h + extra[0] * sh, w + extra[1] * sw, dtype=torch.float64)
    f64 = copy.deepcopy(fcn).double()
    with torch.no_grad():
        out = f64(big)  # (B, K, h', w')
    assert out.dim() == 4 and torch.isfinite(out).all()
    if exact:
        assert out.shape[2:] == (extra[0] + 1, extra[1] + 1), out.shape
        m64 = copy.deepcopy(model).double()
        crops = [big[:, :, oy + i * sh:oy + i * sh + h, ox + j * sw:ox + j * sw + w]
                 for i in range(out.shape[2]) for j in range(out.shape[3])]
        with torch.no_grad():
            ref = m64(torch.cat(crops))  # (cells * B, K)
        cells = out.permute(2, 3, 0, 1).reshape(-1, out.shape[1])  # same order as crops
        torch.testing.assert_close(cells, ref, atol=1e-10, rtol=0)
    if divisor is not None:
        _check_step(fcn, big, size, (sh, sw), divisor)
    assert state_hash(model) == before, "nofc modified the user's model"


def _check_step(fcn, big, size, stride, divisor) -> None:
    """The dilated pass against shift-and-stitch at the smallest step that divides the
    stride by at most ``divisor``: finite wherever shift-and-stitch is, and equal to it
    without padding."""
    step = _step(stride, divisor)
    f64 = copy.deepcopy(fcn).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layer without a dilated form: shift-and-stitch
        dilated = nofc.dense_predict(f64, big, size, step, method="dilate")
    shifted = nofc.dense_predict(f64, big, size, step, method="shift")
    assert dilated.shape == shifted.shape
    assert torch.isfinite(dilated[torch.isfinite(shifted)]).all()
    if not any("pads" in r for r in nofc.geometry(fcn, size).reasons):
        torch.testing.assert_close(dilated, shifted, atol=1e-10, rtol=0)


def _step(stride, divisor) -> tuple[int, int]:
    """The smallest step that divides the stride by at most ``divisor`` (per axis)."""
    return tuple(min(d for d in range(1, s + 1) if s % d == 0 and s // d <= max(1, k))
                 for s, k in zip(stride, divisor))  # type: ignore[return-value]


# --------------------------------------------------------------------------- the strategy itself


def test_strategy_draws_valid_models():
    """The shape bookkeeping in ``architectures()`` agrees with PyTorch."""
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model=models())
    def run(model):
        with torch.no_grad():
            y = model(torch.randn(2, *model.arch.input_size))
        kind, last = model.arch.head[-1]
        assert kind == "Linear" and y.shape == (2, last["out_features"])

    run()


def test_failure_prints_architecture():
    """A failing example is shown as a readable architecture, not a module dump."""
    arch = Arch(input_size=(1, 8, 9), body=[("Conv2d", dict(in_channels=1, out_channels=2,
                                                             kernel_size=(3, 3)))],
                reduce="x.mean((2, 3))",
                head=[("Linear", dict(in_features=2, out_features=3))])
    text = repr(RandomCNN(arch))
    assert "Conv2d(in_channels=1, out_channels=2, kernel_size=(3, 3))" in text
    assert "x.mean((2, 3))" in text and "Linear(in_features=2, out_features=3)" in text


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
