"""The dense map against an exact reference, padded networks included (benchmarks/zoo.py).

A padded network's map cell is not the classifier on its crop (the crop sees zero padding
where the whole image has pixels), so crops can only say "not exact". timm's own
``forward_head`` on each window's part of ``forward_features`` of the whole image is what
the converted network must compute: in float64 it must agree to 1e-10 x max(1, max|ref|).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

import nofc
from nofc.receptive import cached_geometry

from conftest import load_benchmark

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def zoo():
    return load_benchmark("zoo")


def _wake(model: torch.nn.Module) -> torch.nn.Module:
    """Shake every scale, shift and running statistic: random initialisation leaves parts
    of a network dead (timm zero-initialises the last BatchNorm of a residual block and
    starts ConvNeXt's layer scales at 1e-6), where a branch converted wrongly would not
    show in the map."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:  # norm weights and biases, layer scales, gains
                p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_mean.add_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 1.5))
    return model


def _compare(zoo, model, size):
    """(max abs error, max |reference|, map shape, reference shape, image (H, W), lattice
    reason) of the float64 dense map against the float64 reference."""
    fcn = nofc.convert(model, size)
    geo = cached_geometry(fcn, size)  # nofc.geometry, computed once (dense_predict reads it)
    image, why = zoo._reference_image(model, size, geo, torch.float64)
    ref = zoo._reference_map(copy.deepcopy(model).double(), image, size, geo.stride)
    got = nofc.dense_predict(fcn, image, size, dtype=torch.float64)  # a float64 copy
    h, w = ref.shape[-2:]
    # one cell per window wholly inside the image; the map may hold more today (windows
    # reaching past the bottom and right edges of a padded network): those are not compared
    assert got.shape[-2] >= h and got.shape[-1] >= w, (got.shape, ref.shape)
    err = float((got[..., :h, :w] - ref).abs().max())
    return err, float(ref.abs().max()), tuple(got.shape[-2:]), (h, w), image.shape[1:], why


# (name, window side, why it is here); all padded, so none is exact against crops. Small
# variants at 64 pixels (2x2 features): 3x4 windows of a 135x167 image (window + (2, 3)
# strides + 7 pixels), 128x160 where only the lattice keeps the window grid; VGG at 224,
# where its 7x7 fc6 convolution fits the features without adaptive pooling
_FAMILIES = [
    ("resnet10t", 64, "residual adds, max pool"),
    ("test_efficientnet", 64, "depthwise, squeeze-and-excitation (global context)"),
    ("test_convnext", 64, "4x4 patch stem, LayerNorm2d head after pooling"),
    ("regnetx_002", 64, "grouped convolutions"),
    ("mobilenetv3_small_050", 64, "conv_head after the pooling in forward_head, SE"),
    ("dla46x_c", 64, "stride-2 branches that meet in adds: the lattice"),
    ("ghostnet_050", 64, "cheap operations: concat and slice of channels, SE"),
    ("rexnet_100", 64, "channel padding in residuals, SE"),
    ("cs3darknet_focus_s", 64, "space-to-depth stem, cross-stage splits"),
    ("dpn48b", 64, "dual paths: channel slices and concats"),
    ("repvgg_a0", 64, "parallel 3x3, 1x1 and identity branches"),
    ("tf_mixnet_s", 64, "TensorFlow 'same' padding from the input size, mixed kernels"),
    ("edgenext_xx_small", 64, "transposed attention over all tokens, measured geometry"),
    ("mambaout_femto", 64, "channels-last (NHWC) features and head"),
    ("test_nfnet", 64, "F.conv2d with standardised weights, measured geometry"),
    ("pvt_v2_b0", 64, "attention over all (reduced) positions"),
    ("densenet121", 64, "dense concatenations"),
    ("hrnet_w18_small", 64, "upsampling branches, measured geometry, the lattice"),
    ("vgg11", 224, "ConvMlp pre-logits (a 7x7 convolution) in the head"),
]
# over 20 s each on one core, or over 10 s where a faster case reads the same kind of layer:
# run by `make test-all` (make test leaves out what is marked slow)
_SLOW = {"densenet121", "hrnet_w18_small", "vgg11", "mambaout_femto", "edgenext_xx_small",
         "tf_mixnet_s", "dpn48b", "repvgg_a0", "pvt_v2_b0"}


@pytest.mark.parametrize("name, side, why", [
    pytest.param(*case, marks=[pytest.mark.slow] if case[0] in _SLOW else [], id=case[0])
    for case in _FAMILIES])
def test_dense_map_is_the_reference(zoo, name, side, why):
    torch.manual_seed(0)
    model = _wake(timm.create_model(name, num_classes=10).eval())
    t0 = time.perf_counter()
    err, scale, got, want, hw, lattice = _compare(zoo, model, (3, side, side))
    print(f"{name}: max abs error {err:.1e} (max |ref| {scale:.1e}), map {got}, "
          f"{want} windows of {tuple(hw)}{' (' + lattice + ')' if lattice else ''}, "
          f"{time.perf_counter() - t0:.1f} s")
    assert want == (3, 4)
    assert err <= 1e-10 * max(1.0, scale), (err, scale)


def test_nfnet_skipinit_is_the_reference(zoo):
    """dm_nfnet_f0's block (skipinit: an in-place ``out.mul_(skipinit_gain)`` whose result
    nothing reads, once dropped by the conversion) in test_nfnet's size."""
    from timm.models.nfnet import NormFreeNet, model_cfgs

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfgs["test_nfnet"], skipinit=True)
    model = _wake(NormFreeNet(cfg, num_classes=10).eval())
    err, scale, *_ = _compare(zoo, model, (3, 64, 64))
    assert err <= 1e-10 * max(1.0, scale), (err, scale)


# --------------------------------------------------------------------------- the stage


def _stage(zoo, spec, model, fcn, size, geo, low=False) -> list:
    got = []
    zoo._reference_stage(spec, model, fcn, size, geo, low,
                         lambda stage, status, detail="": got.append((stage, status, detail)))
    return got


def test_stage_says_wrong_for_a_wrong_map(zoo):
    """A converted network changed in its stem: crops cannot tell (padded, never exact),
    the reference can."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    [(stage, status, detail)] = _stage(zoo, "timm:resnet10t", model, fcn, size, geo)
    assert (stage, status) == ("reference", "ok"), detail
    assert detail.endswith("3x4 cells of a 135x167 image")
    with torch.no_grad():
        fcn.get_submodule("conv1.0").weight.add_(1e-3)
    [(stage, status, detail)] = _stage(zoo, "timm:resnet10t", model, fcn, size, geo)
    assert (stage, status) == ("reference", "WRONG"), detail


def test_stage_has_no_reference_without_a_feature_map(zoo):
    assert _stage(zoo, "torchvision:alexnet", None, None, (3, 224, 224), None) == [
        ("reference", "-", "not a timm model")]
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=5).eval()  # tokens (1, N, C)
    size = (3, *vit.default_cfg["input_size"][1:])
    with pytest.raises(zoo._NoReference, match=r"features of one window are \(1, \d+, "
                                                r"\d+\), not a map"):
        zoo._reference_map(vit, torch.randn(*size), size, (16, 16))


def test_reference_checks_the_step_is_the_feature_stride(zoo):
    torch.manual_seed(0)
    model = timm.create_model("test_byobnet", num_classes=5).eval()
    image = torch.randn(3, 128, 160)
    with pytest.raises(zoo._Disagrees, match="the stride 16x16 is not the feature map's"):
        zoo._reference_map(model, image, (3, 64, 64), (16, 16))
    assert zoo._reference_map(model, image, (3, 64, 64), (32, 32)).shape == (1, 5, 3, 4)


def test_summary_counts_a_wrong_reference(zoo, tmp_path):
    ok = ["ok", ""]
    rows = [
        {"spec": "timm:a", "seconds": 1, "stages": {
            **dict.fromkeys(zoo.STAGES, ok), "reference": ["WRONG", "3e-02"]}},
        {"spec": "timm:b", "seconds": 1, "stages": dict.fromkeys(zoo.STAGES, ok)},
        {"spec": "timm:c", "seconds": 1, "stages": {  # no feature map: not a failure
            **dict.fromkeys(zoo.STAGES, ok), "reference": ["-", "not a map"]}},
    ]
    [line, _] = zoo._summary(rows, "timm")
    assert "reference 1 of 2, tiled 3" in line and "wrong maps 1 (dense 0, reference 1)" in line
    assert "the whole pipeline 2 (" in line and "first refusal by kind: wrong map 1." in line
    assert zoo._refusal(rows[0]) == "reference WRONG: 3e-02" and zoo._refusal(rows[2]) == ""
    out = tmp_path / "coverage.md"
    zoo._write_table(rows, {}, out, "python benchmarks/zoo.py")
    table = [x for x in out.read_text().splitlines() if x.startswith("|")]
    assert "| dense | reference | tiled |" in table[0]
    assert all(x.count("|") == table[0].count("|") for x in table)
    assert "| ok | WRONG | ok |" in table[2] and "| ok | - | ok |" in table[4]
