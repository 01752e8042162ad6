"""nofc.geometry: stride, offset, window and exactness derived from the layers."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import nofc
from nofc import NofcError
from nofc.zoo import LeNet5


def _vgg_like(padding=0, ceil_mode=False, bn=False):
    """A padding-free (by default) VGG-style stack: 3x36x36 -> 64x2x2 -> 7 classes."""
    layers, c = [], 3
    for out, n in ((16, 2), (32, 2), (64, 1)):
        for _ in range(n):
            layers += [nn.Conv2d(c, out, 3, padding=padding)]
            layers += [nn.BatchNorm2d(out)] if bn else []
            layers += [nn.ReLU()]
            c = out
        layers += [nn.MaxPool2d(2, ceil_mode=ceil_mode)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 2 * 2, 24), nn.ReLU(),
                         nn.Linear(24, 7))


def test_vgg16():
    fcn = nofc.convert(torchvision.models.vgg16(), input_size=(3, 224, 224))
    geo = nofc.geometry(fcn, input_size=(3, 224, 224))
    assert geo.stride == (32, 32)
    assert geo.offset == (0, 0)
    assert geo.window == (224, 224)
    assert geo.exact is False
    assert any("pads" in r for r in geo.reasons)
    assert geo.output_shape((384, 384)) == (6, 6)
    # 13 3x3 convs with padding 1 and 5 pools, then fc6 as a 7x7 conv on the stride-32 map
    assert geo.receptive_field == (404, 404)
    assert geo.rf_offset == (-90, -90)
    boxes = geo.boxes((384, 384))
    assert boxes.shape == (6, 6, 4) and boxes.dtype == np.int64
    assert boxes[2, 3].tolist() == [64, 96, 288, 320]


def test_lenet5_exact():
    fcn = nofc.convert(LeNet5(), input_size=(1, 32, 32))
    geo = nofc.geometry(fcn, input_size=(1, 32, 32))
    assert geo.stride == (4, 4) and geo.offset == (0, 0) and geo.window == (32, 32)
    assert geo.exact is True and geo.reasons == ()
    assert geo.receptive_field == (32, 32) and geo.rf_offset == (0, 0)
    assert geo.output_shape((32, 32)) == (1, 1)
    assert geo.output_shape((64, 40)) == (9, 3)
    assert geo.output_shape((31, 40)) == (0, 3)
    assert geo.min_size() == (32, 32)
    b = geo.boxes((64, 40))
    assert b[8, 2].tolist() == [32, 8, 64, 40]  # the last window ends at the image edge


@pytest.mark.parametrize("padding,ceil_mode,exact", [(0, False, True), (1, False, False),
                                                     (0, True, False)])
def test_padding_and_ceil_mode(padding, ceil_mode, exact):
    size = (3, 36, 36) if padding == 0 else (3, 16, 16)  # padded: 16 -> 8 -> 4 -> 2
    model = _vgg_like(padding, ceil_mode)
    fcn = nofc.convert(model.eval(), size)
    geo = nofc.geometry(fcn, size)
    assert geo.stride == (8, 8)
    assert geo.exact is exact
    with torch.no_grad():
        for hw in [(size[1], size[2]), (size[1] + 5, size[2] + 12), (2 * size[1] + 1, 61)]:
            assert fcn(torch.randn(1, 3, *hw)).shape[2:] == geo.network_shape(hw), hw
            assert geo.output_shape(hw) == _inside(hw, size, geo.stride), hw


@pytest.mark.parametrize("name,size,stride", [
    ("resnet18", (3, 64, 64), 32),
    ("squeezenet1_0", (3, 64, 64), 16),  # ceil_mode max pooling
    ("mobilenet_v3_small", (3, 64, 64), 32),  # squeeze-excitation: global context
    ("convnext_tiny", (3, 64, 64), 32),  # channels-last blocks: permute, LayerNorm, Linear
])
def test_torchvision_models(name, size, stride):
    model = torchvision.models.get_model(name, weights=None).eval()
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    assert geo.stride == (stride, stride)
    assert geo.window == size[1:] and geo.offset == (0, 0)
    assert geo.exact is False
    if name == "mobilenet_v3_small":
        assert any("global context" in r for r in geo.reasons)
    with torch.no_grad():
        for hw in [(size[1] + 37, size[2] + 70), (size[1] + 2 * stride, size[2] + 1)]:
            assert tuple(fcn(torch.randn(1, 3, *hw)).shape[2:]) == geo.network_shape(hw)
            assert geo.output_shape(hw) == _inside(hw, size, geo.stride)


def test_plain_model_is_traced():
    # a fully convolutional module that nofc did not convert works too
    net = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2, dilation=2), nn.ReLU(),
                        nn.AvgPool2d(3, stride=3), nn.Conv2d(4, 2, 2))
    geo = nofc.geometry(net, (1, 23, 23))
    assert geo.stride == (6, 6) and geo.exact is True
    assert geo.receptive_field == (19, 19)  # the pooling floors: 4 columns are never read
    for h in (23, 29, 30, 47, 100):
        assert net(torch.randn(1, 1, h, h + 3)).shape[2:] == geo.network_shape((h, h + 3))
        assert geo.output_shape((h, h + 3)) == _inside((h, h + 3), (1, 23, 23), geo.stride)


def _inside(hw, size, step):
    """The map's definition, written independently: one cell per window inside."""
    return tuple(max((hw[a] - size[1 + a]) // step[a] + 1, 0) for a in (0, 1))


def test_as_dict_has_the_convention():
    geo = nofc.geometry(nofc.convert(LeNet5(), (1, 32, 32)), (1, 32, 32))
    d = geo.as_dict()
    assert d["stride"] == [4, 4] and d["window"] == [32, 32] and "y0" in d["box_convention"]


def test_errors():
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    with pytest.raises(NofcError, match="reference size 36x36"):
        nofc.geometry(fcn, (1, 36, 36))
    glob = nofc.convert(torchvision.models.resnet18(), (3, 64, 64), pooling="global")
    with pytest.raises(NofcError, match="pooling='window'"):
        nofc.geometry(glob, (3, 64, 64))
    up = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 4),
                       nn.AdaptiveAvgPool2d(1))
    with pytest.raises(NofcError, match=r"'1' \(Upsample\) upsamples a map of stride 1x1 by "
                                        r"2x2: its cells would not be whole pixels apart.*"
                                        "stays 1x1 at any input size"):
        nofc.geometry(up, (1, 8, 8))
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(NofcError, match=r"'1' \(AdaptiveAvgPool2d\) pools over the whole map"):
        nofc.geometry(pooled, (1, 8, 8))
    with pytest.raises(NofcError, match=r"image size must be \(H, W\)"):
        nofc.geometry(fcn, (1, 32, 32)).output_shape((1, 2, 3))


def test_network_on_another_device():
    # probes run on the network's own device (meta here stands in for CUDA)
    fcn = nofc.convert(LeNet5(), (1, 32, 32)).to("meta")
    geo = nofc.geometry(fcn, (1, 32, 32))
    assert geo.stride == (4, 4) and geo.exact


def test_skip_path_cropped_by_slicing():
    """Padding-free residual blocks crop the skip path (``x[:, :, 2:-2, 2:-2]``): a crop is
    a window of one pixel with negative padding, not padding."""
    from test_dilation import CroppedResidual

    fcn = nofc.convert(CroppedResidual(), input_size=(3, 26, 26))
    geo = nofc.geometry(fcn, input_size=(3, 26, 26))
    assert geo.exact and geo.reasons == ()
    assert geo.stride == (4, 4) and geo.receptive_field == (26, 26) and geo.rf_offset == (0, 0)
    assert geo.output_shape((50, 31)) == (7, 2)


def test_crop_that_depends_on_the_size_is_refused():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x)[:, :, 0:4, 0:4]  # a fixed end: not a sliding window

    with pytest.raises(NofcError, match=r"node 'getitem' .* changes the map in a way nofc "
                                        r"cannot read .* is \(4, 4\), not 1x1"):
        nofc.geometry(Head(), input_size=(1, 6, 6))


# --------------------------------------------------------------------------- measured
# Layers nofc cannot read from their arguments (a reshape into tokens and back, an
# upsampling branch, a weight computed in the graph): the geometry is measured instead.


class _SpaceToDepth(nn.Module):
    """TResNet's stem: each 2x2 block of pixels becomes 4 channels (a reshape)."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2)


class _TokenMix(nn.Module):
    """Flatten the map into tokens, mix them, fold them back (``mix`` over all tokens or
    per token)."""

    def __init__(self, channels, everywhere: bool):
        super().__init__()
        self.proj = nn.Linear(channels, channels)
        self.everywhere = everywhere

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.proj(x.flatten(2).transpose(1, 2))  # (B, HW, C): per token
        if self.everywhere:
            t = t + t.mean(1, keepdim=True)  # every token sees every token
        return t.transpose(1, 2).reshape(b, c, h, w)


def _measured_net(mix=None):
    torch.manual_seed(0)
    body = [_SpaceToDepth(), nn.Conv2d(4, 6, 3), nn.ReLU()]
    if mix is not None:
        body.append(_TokenMix(6, everywhere=mix))
    return nn.Sequential(*body, nn.Conv2d(6, 5, 6)).double().eval()  # 16x16 -> 1x1


def test_measured_geometry_is_exact_where_the_cells_are_the_crops():
    net = _measured_net(mix=False)
    geo = nofc.geometry(net, (1, 16, 16))
    assert "'0' (_SpaceToDepth)" in geo.measured or "view" in geo.measured
    assert (geo.stride, geo.exact, geo.receptive_field, geo.rf_offset) == (
        (2, 2), True, (16, 16), (0, 0))
    assert geo.output_shape((40, 56)) == (13, 21)
    img = torch.randn(1, 40, 56, dtype=torch.float64)
    report = nofc.verify(net, net, (1, 16, 16), image=img)
    assert report.exact and report.cells == 13 * 21 and report.ok, report
    with pytest.raises(NofcError, match="measured"):  # no layer by layer dilation
        nofc.dilate(net, (1, 16, 16), 1)
    tiled = nofc.tiled_predict(net, img.numpy(), (1, 16, 16), tile=20, progress=False)
    dense = nofc.dense_predict(net, img, (1, 16, 16))[0].numpy()
    np.testing.assert_allclose(tiled, dense, rtol=0, atol=1e-4 * np.abs(dense).max())


def test_measured_global_context_is_flagged_and_tiling_refused():
    net = _measured_net(mix=True)  # a mean over all tokens nothing records
    geo = nofc.geometry(net, (1, 16, 16))
    assert not geo.exact and "every map cell depends on every input pixel" in geo.reasons[0]
    assert "global context" in geo.reasons[0]
    img = np.random.default_rng(0).standard_normal((1, 40, 56))
    assert nofc.dense_predict(net, torch.from_numpy(img), (1, 16, 16)).shape == (1, 5, 13, 21)
    with pytest.raises(NofcError, match="global context inside its body: .*every map cell "
                                        "depends on every input pixel"):
        nofc.tiled_predict(net, img, (1, 16, 16), tile=20, progress=False)


def test_measured_map_that_follows_no_stride_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Upsample(scale_factor=2),
                        nn.Conv2d(2, 2, 8))  # 9 -> 4 -> 8 -> 1: grows by 2 every 2 pixels
    size = (1, 9, 9)
    with pytest.raises(NofcError, match=r"'1' \(Upsample\) upsamples a coarser map, and the "
                                        r"output's cells come in groups of 2x2 .* does not "
                                        "grow by one cell per fixed number of pixels"):
        nofc.geometry(net, size)


class _Blocks(nn.Module):
    """HaloNet's or MobileViT's attention in miniature: the map is cut into blocks of
    ``block`` cells (an assert without a message checks it), so the network runs only on
    images in steps of ``block`` strides."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block
        self.conv = nn.Conv2d(1, 2, 8, stride=8)
        self.head = nn.Conv2d(2, 3, block)  # one cell per window of block x 8 pixels

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        k = self.block
        torch._assert(h % k == 0, "")
        return self.head(x.reshape(b, c, h // k, k, w // k, k).reshape(b, c, h, w))


@pytest.mark.parametrize("block", [32, 2])  # past the largest probe; at one stride more
def test_network_that_runs_in_coarser_steps_than_its_stride_is_refused_in_one_line(block):
    with pytest.raises(NofcError) as info:
        nofc.geometry(_Blocks(block), (1, 8 * block, 8 * block))
    msg = str(info.value)
    assert "\n" not in msg and "fails (an assert without a message)" in msg, msg
    assert "needs image sizes in coarser steps than" in msg, msg


# --------------------------------------------------------------------------- upsampling
# An upsampling by a power of two is read layer by layer: cells stride / f apart, each
# coarse cell repeated (nearest) or interpolated with its neighbour (bilinear), a lattice
# of one stride again once a stride as coarse as the coarse map's follows.


class TwoBranches(nn.Module):
    """HRNet in miniature: a stride-2 branch upsampled x2 and added to the stride-1 one,
    then a head down to one cell per 32x32 window (stride 8). ``how``: the upsampling as
    ``nn.Upsample``, as ``F.interpolate`` by a factor, or to a size computed from the map
    (which the walk cannot read: the geometry is measured, with gradients)."""

    def __init__(self, mode="nearest", padded=False, how="module"):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 2, stride=2)
        self.high = nn.Conv2d(4, 4, 3, padding=1) if padded else nn.Conv2d(4, 4, 1)
        self.low = (nn.Conv2d(4, 4, 3, stride=2, padding=1) if padded
                    else nn.Conv2d(4, 4, 2, stride=2))
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 4, stride=4), nn.ReLU(),
                                  nn.Conv2d(6, 5, 4))
        self.mode, self.how = mode, how

    def forward(self, x):
        x = self.stem(x)  # (B, 4, H/2, W/2)
        low = self.low(x)  # (B, 4, H/4, W/4)
        if self.how == "module":
            up = self.up(low)
        elif self.how == "function":
            up = F.interpolate(low, scale_factor=2, mode=self.mode)
        else:
            up = F.interpolate(low, size=(2 * low.shape[2], 2 * low.shape[3]), mode=self.mode)
        return self.head(self.high(x) + up)


def _two_branches(mode="nearest", padded=False, how="module"):
    torch.manual_seed(0)
    return TwoBranches(mode, padded, how).double().eval()


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("padded", [False, True])
def test_upsampling_is_read_and_matches_the_measured_geometry(mode, padded):
    size = (1, 32, 32)
    geo = nofc.geometry(_two_branches(mode, padded), size)
    by_function = nofc.geometry(_two_branches(mode, padded, "function"), size)
    measured = nofc.geometry(_two_branches(mode, padded, "size"), size)
    assert not geo.measured and not by_function.measured
    assert len(geo.reasons) == len(by_function.reasons)  # the labels differ: 'up', 'interpolate'
    assert geo == nofc.Geometry(**{**vars(by_function), "reasons": geo.reasons})
    assert "resizes the map to a given size" in measured.measured
    # the field the walk derives is the one the gradients show, phase by phase unioned
    assert (geo.stride, geo.receptive_field, geo.rf_offset, geo.lattice) == (
        measured.stride, measured.receptive_field, measured.rf_offset, measured.lattice)
    exact = mode == "nearest" and not padded  # bilinear repeats the border cells
    assert geo.exact == measured.exact == exact
    assert any("'up' (Upsample) interpolates bilinearly" in r for r in geo.reasons) == (
        mode == "bilinear")
    net = _two_branches(mode, padded)
    for hw in ((32, 32), (40, 72), (64, 96), (57, 43)):
        with torch.no_grad():
            probed = tuple(net(torch.zeros(1, 1, *geo.fit(hw), dtype=torch.float64)).shape[2:])
        assert geo.output_shape(hw) == measured.output_shape(hw) == probed, hw


def test_upsampled_branch_fields():
    """The numbers: nearest adds no pixel, bilinear a coarse cell (4 pixels) each side."""
    nearest = nofc.geometry(_two_branches("nearest"), (1, 32, 32))
    bilinear = nofc.geometry(_two_branches("bilinear"), (1, 32, 32))
    assert (nearest.stride, nearest.receptive_field, nearest.rf_offset, nearest.exact) == (
        (8, 8), (32, 32), (0, 0), True)
    assert (bilinear.receptive_field, bilinear.rf_offset) == ((40, 40), (-4, -4))


@pytest.mark.parametrize("mode, padded", [("nearest", False), ("bilinear", True)])
def test_upsampled_branch_tiles_equal_dense_and_cells_equal_crops(mode, padded):
    size = (1, 32, 32)
    net = _two_branches(mode, padded)
    img = torch.randn(1, 32 + 8 * 21, 32 + 8 * 14, dtype=torch.float64)
    tiled = nofc.tiled_predict(net, img.numpy(), size, tile=40, progress=False,
                               dtype=torch.float64)
    dense = nofc.dense_predict(net, img, size)[0].numpy()
    assert tiled.shape == dense.shape == (5, 22, 15)
    np.testing.assert_allclose(tiled, dense, rtol=0, atol=1e-10)
    report = nofc.verify(net, net, size, image=img)
    assert report.exact == (mode == "nearest") and (report.ok or not report.exact), report
    with pytest.raises(NofcError, match=r"'up' \(Upsample\) is a window nofc cannot dilate"):
        nofc.dilate(net, size, 4)


@pytest.mark.parametrize("up, why", [
    (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
     "upsamples with align_corners=True: where its cells sample the map depends on the "
     "map's size"),
    (nn.Upsample(scale_factor=2, mode="bicubic"), "upsamples with mode 'bicubic'"),
    (nn.Upsample(size=(8, 8)), "resizes the map to a given size"),
])
def test_upsampling_nofc_cannot_read_is_measured_or_refused_with_the_reason(up, why):
    net = nn.Sequential(nn.Conv2d(1, 2, 4, stride=4), up, nn.Conv2d(2, 3, 2, stride=2))
    try:
        geo = nofc.geometry(net, (1, 4, 4))
    except NofcError as exc:  # a fixed size: the map stays 4x4
        assert why in str(exc)
    else:
        assert why in geo.measured


@pytest.mark.slow
def test_hrnet_is_read_layer_by_layer_and_tiles():
    """timm's HRNet adds upsampled low-resolution branches (nearest, x2 to x8) to
    high-resolution ones: geometry reads them (the field is the one gradients measure at
    1056x1056), no global context, and tiles equal the whole-image map."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    fcn = nofc.convert(model, size).double()
    geo = nofc.geometry(fcn, size)
    assert not geo.measured and not any("global context" in r for r in geo.reasons)
    assert (geo.stride, geo.receptive_field, geo.rf_offset) == ((32, 32), (775, 775),
                                                                (-291, -291))
    # wider than the field: the tiles' inputs are cut on the left and on the right
    img = np.random.default_rng(0).standard_normal((3, 224 + 32 * 2, 224 + 32 * 24))
    tiled = nofc.tiled_predict(fcn, img, size, tile=160, dtype=torch.float64,
                               progress=False)
    dense = nofc.dense_predict(fcn, torch.from_numpy(img), size)[0].numpy()
    assert tiled.shape == dense.shape == (1000, 3, 25)
    np.testing.assert_allclose(tiled, dense, rtol=0, atol=1e-10 * max(1, np.abs(dense).max()))


def test_global_context_is_a_typed_fact():
    """Code tests ``geo.global_context``, not the text of a reason."""
    se = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    geo = nofc.geometry(nofc.convert(se, (3, 64, 64)), (3, 64, 64))
    assert geo.global_context and all(c in geo.reasons for c in geo.global_context)
    assert geo.as_dict()["global_context"] == list(geo.global_context)
    plain = nofc.geometry(nofc.convert(LeNet5(), (1, 32, 32)), (1, 32, 32))
    assert plain.global_context == ()
    measured = nofc.geometry(_measured_net(mix=True), (1, 16, 16))
    assert measured.measured and measured.global_context
