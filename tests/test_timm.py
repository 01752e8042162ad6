"""Cross-check against timm, whose VGG already holds fc6/fc7 as convolutions (ConvMlp)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import nofc
from nofc import streaming
from nofc.conversion import convert_with_record

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


# --------------------------------------------------------------------------- the zoo
# One small model per family, each covering a rule.
_OK = ["resnet10t", "densenet121", "dpn48b", "cs3darknet_s", "gernet_s", "regnetx_002",
       "repvgg_a0", "dla34", "selecsls42b",
       "convnext_atto",  # LayerNorm2d on the pooled map
       "mambaout_femto"]  # channels-last head: x.mean((1, 2)), LayerNorm, Linear
_CONTEXT = ["mobilenetv3_small_050",  # timm's Linear, SE gates
            "ghostnet_050", "lcnet_050", "efficientnet_b0", "mixnet_s", "rexnet_100",
            "tinynet_e", "mnasnet_small", "skresnet18",
            "resnest14d",  # split attention: its gate's reshapes are not flattens
            "pvt_v2_b0",  # attention over all (reduced) positions
            "efficientvit_b0",  # captured (autocast), LayerNorm head, linear attention
            "mobilevit_xxs"]  # captured (patch-size control flow)
_REFUSED = [
    ("vit_tiny_patch16_224", r"'head' \(Linear\).*takes one token of a \(2, 197, 192\) "
                             r"sequence \(a class token\)"),
    ("efficientvit_m0", r"cannot trace EfficientVitMsra with torch.fx .* fails at 448x448"),
    ("tiny_vit_5m_224", r"cannot trace TinyVit with torch.fx .*: the forward captured at "
                        r"224x224 fails"),
]
# (name, input size, what happens): "ok" converts and verifies in float64; "context" the
# same, with global context recorded (squeeze-and-excitation, attention over all
# positions); else the refusal, at the model's own size
_ZOO = ([(n, 64, "ok") for n in _OK] + [(n, 64, "context") for n in _CONTEXT]
        + [(n, 224, why) for n, why in _REFUSED])
_SLOW = {"densenet121", "efficientvit_b0", "mobilevit_xxs", "tiny_vit_5m_224"}


@pytest.mark.parametrize("name, side, expect", [
    pytest.param(*case, marks=[pytest.mark.slow] if case[0] in _SLOW else [])
    for case in _ZOO])
def test_timm_family(name, side, expect):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    size = (3, side, side)
    if expect not in ("ok", "context"):
        with pytest.raises(nofc.NofcError, match=expect) as info:
            nofc.convert(model, size)
        assert "\n" not in str(info.value) and "internal" not in str(info.value)
        return
    fcn, record = convert_with_record(model, size)
    report = nofc.verify(model, fcn, size, batch=1)
    assert report.ok, report
    assert bool(record.global_context) == (expect == "context"), record.plan


def test_timm_dense_map_is_the_classifier_on_crops():
    """resnet10t end to end: geometry, a non-square map, the cells against the crops."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    assert geo.stride == (32, 32)
    img = torch.randn(3, 64 + 2 * 32, 64 + 3 * 32)
    assert nofc.dense_predict(fcn, img, size).shape == (1, 5, 3, 4)
    r = nofc.verify(model, fcn, size, image=img)
    assert r.cells == 12 and r.exact is False  # padding: cells near borders differ


def test_timm_model_from_the_command_line(capsys):
    from nofc.cli import main
    from nofc.io import default_input_size, load_model

    model = load_model("timm:resnet10t")
    assert default_input_size(model) == (3, 176, 176)  # its pretrained config
    assert main(["explain", "timm:resnet10t", "--input-size", "3x64x64", "--changed"]) == 0
    assert "Conv2d 512->1000" in capsys.readouterr().out
    assert main(["explain", "timm:resnet10t", "--changed"]) == 0  # its own 3x176x176
    assert "at input 3x176x176" in capsys.readouterr().out
    assert main(["explain", "nofc:lenet5"]) == 2  # no size of its own: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input-size is needed for nofc:lenet5" in err
    with pytest.raises(nofc.NofcError, match="unknown timm model 'resnet_nope'"):
        load_model("timm:resnet_nope")


# --------------------------------------------------------------------------- the pipeline
# geometry, a non-square dense map, the cells against the crops, tiled equal to dense: on
# geometry read layer by layer (shape queries, chunk/split, channels-last blocks, stride
# multiples) and measured (token reshapes, stacks, computed weights, upsampling branches);
# global context (SE gates, attention over all positions) refuses tiling, in one line
_PIPELINE = [("resnet10t", "read"), ("dla34", "read"),  # residual adds of stride-2 branches
             ("cs3darknet_s", "read"),  # norm-act layers that read x.ndim
             ("fasternet_t0", "read"),  # torch.split of the map
             ("mambaout_femto", "read"),  # channels-last blocks and head
             ("test_nfnet", "context"),  # F.conv2d with a standardised (computed) weight
             ("skresnet18", "context"),  # torch.stack of branches
             ("resnest14d", "context"),  # radix reshapes
             ("pvt_v2_b0", "context"),  # tokens and back, attention over all positions
             ("tf_efficientnet_lite0", "read"),  # TensorFlow "same" padding, fixed
             ("hrnet_w18_small", "read"),  # upsampling branches read, 775-pixel field
             ("edgenext_xx_small", "context")]  # transposed attention over all tokens
_PIPELINE_SLOW = {"hrnet_w18_small", "edgenext_xx_small", "mambaout_femto"}


@pytest.mark.parametrize("name, expect", [
    pytest.param(*case, marks=[pytest.mark.slow] if case[0] in _PIPELINE_SLOW else [])
    for case in _PIPELINE])
def test_timm_pipeline(name, expect):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    size = (3, 64, 64)
    fcn = nofc.convert(model, size)
    geo = nofc.geometry(fcn, size)
    assert geo.stride == (32, 32) and bool(geo.measured) == (expect != "read"), geo
    img = torch.randn(3, 64 + 2 * 32, 64 + 3 * 32)
    dense = nofc.dense_predict(fcn, img, size)
    assert dense.shape == (1, 4, 3, 4) == (1, 4, *geo.output_shape(img.shape[1:]))
    # rows and columns past the last window: the cells geometry says (DLA's adds crashed
    # there before they were cropped to the lattice)
    off = torch.randn(3, 64 + 2 * 32 + 5, 64 + 3 * 32 + 31)
    assert nofc.dense_predict(fcn, off, size).shape[2:] == geo.output_shape(off.shape[1:])
    report = nofc.verify(model, fcn, size, image=img)
    assert report.cells == 12 and report.exact is False  # all padded: honest, not equal
    context = list(geo.global_context)
    assert bool(context) == (expect == "context"), geo.reasons
    if context:
        with pytest.raises(nofc.NofcError, match="global context inside its body") as info:
            nofc.tiled_predict(fcn, img.numpy(), size, tile=64, progress=False)
        assert "\n" not in str(info.value)
        return
    tiled = nofc.tiled_predict(fcn, img.numpy(), size, tile=64, progress=False)
    np.testing.assert_allclose(tiled, dense[0].numpy(), rtol=0,
                               atol=1e-4 * float(dense.abs().max()))
    # stage by stage in chunks (nofc.streaming), as large images run: the same map
    parts = streaming.stages(fcn, geo, 3)
    assert (parts is not None) == (expect == "read")
    if parts:
        fcn64 = copy.deepcopy(fcn).double()
        x = img[None].double()
        with torch.no_grad():
            want = fcn64(x)
            got = streaming._run(streaming.stages(fcn64, geo, 3), x, chunk=32)
        assert float((got - want).abs().max()) <= 1e-10 * max(1.0, float(want.abs().max()))


class _SameCell(torch.nn.Module):
    """NASNet's reduction cell in miniature, from timm's TensorFlow "same" layers: a 1x1
    and a 3x3 stride-2 branch and a stride-2 max pool meet in an add; timm's global
    average head."""

    def __init__(self):
        super().__init__()
        from timm.layers import create_conv2d, create_pool2d

        self.stem = create_conv2d(3, 8, 3, stride=2, padding="same")
        self.one = create_conv2d(8, 8, 1, stride=2, padding="same")
        self.three = create_conv2d(8, 8, 3, stride=2, padding="same")
        self.pool = create_pool2d("max", 3, stride=2, padding="same")
        self.last = create_conv2d(8, 6, 3, stride=2, padding="same")
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.one(x) + self.three(x) + self.pool(x)
        return self.fc(self.last(x).mean((2, 3)))


def test_tensorflow_same_padding_is_fixed_at_the_reference_size(monkeypatch):
    """Pads computed from the input size become the reference size's amounts: the network
    is the original on every window + k x stride image, and only runs there (its branches
    meet only there), so every run is cropped to such a size."""
    torch.manual_seed(0)
    size = (3, 32, 32)
    model = _SameCell().double().eval()
    fcn, record = convert_with_record(model, size)
    fixed = [r for r in record.changes if r.kind == "fixed_pad"]
    assert [(r.node, r.pad) for r in fixed] == [
        ("pad", (0, 1, 0, 1)), ("pad_2", (0, 1, 0, 1)), ("pad_3", (0, 1, 0, 1)),
        ("pad_4", (0, 1, 0, 1))]  # the 1x1 branch's pad is 0 at any size
    table = str(nofc.explain(model, size))
    assert "pad (amounts from the input size)" in table and "pad (0, 1, 0, 1)" in table
    assert nofc.verify(model, fcn, size).ok
    # the original on a lattice size (window + k x stride) is the converted body there
    glob = nofc.convert(model, size, pooling="global")
    x = torch.randn(1, 3, 32 + 2 * 16, 32 + 3 * 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(glob(x)[:, :, 0, 0], model(x), rtol=0, atol=1e-12)
        with pytest.raises(RuntimeError):  # off the lattice the fixed branches disagree
            fcn(x[..., :-1, :-1])
    geo = nofc.geometry(fcn, size)
    assert geo.lattice and not geo.measured and geo.stride == (8, 8), geo
    assert geo.fit((32 + 2 * 8 + 5, 32 + 3 * 8 + 7)) == (48, 56)
    img = torch.randn(3, 32 + 2 * 8 + 5, 32 + 3 * 8 + 7, dtype=torch.float64)
    dense = nofc.dense_predict(fcn, img, size)
    assert dense.shape == (1, 5, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(dense, fcn(img[None, :, :48, :56]), rtol=0, atol=0)
    tiled = nofc.tiled_predict(fcn, img.numpy(), size, tile=8, progress=False)  # float32
    np.testing.assert_allclose(tiled, dense[0].numpy(), rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="branches that meet only there"):
        fine = nofc.dense_predict(fcn, img, size, step=4)
    torch.testing.assert_close(fine[..., ::2, ::2], dense, rtol=0, atol=1e-12)
    with monkeypatch.context() as m:  # stage by stage in chunks, as a large image runs
        m.setattr(streaming, "STREAM_PIXELS", 1)
        m.setattr(streaming, "CHUNK", 16)
        torch.testing.assert_close(nofc.dense_predict(fcn, img, size), dense, rtol=0,
                                   atol=1e-12)
    # ONNX: the exporters write height and width as window + k x stride
    ort = pytest.importorskip("onnxruntime")
    fcn32 = nofc.convert(model.float(), size)
    proto = nofc.export_onnx(fcn32, input_size=size)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = img[None, :, :48, :56].float()
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = fcn32(x).numpy()
    assert got.shape == want.shape == (1, 5, 3, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_timm_dla_runs_on_images_off_its_lattice(monkeypatch):
    """DLA's stride-2 branches meet in adds that need the window plus a multiple of the
    stride: any other image is cropped to such a size (Geometry.fit), losing no cell;
    stage by stage in chunks (a large image) the map is the same."""
    torch.manual_seed(0)
    size = (3, 64, 64)
    fcn = nofc.convert(timm.create_model("dla34", num_classes=4).eval(), size)
    geo = nofc.geometry(fcn, size)
    assert geo.lattice and geo.fit((64 + 2 * 32 + 5, 64 + 3 * 32 + 19)) == (128, 160)
    img = torch.randn(3, 64 + 2 * 32 + 5, 64 + 3 * 32 + 19)
    dense = nofc.dense_predict(fcn, img, size)
    assert dense.shape == (1, 4, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(dense, fcn(img[None, :, :128, :160]), rtol=0, atol=0)
    tiled = nofc.tiled_predict(fcn, img.numpy(), size, tile=32, progress=False)
    np.testing.assert_allclose(tiled, dense[0].numpy(), rtol=0,
                               atol=1e-4 * float(dense.abs().max()))
    monkeypatch.setattr(streaming, "STREAM_PIXELS", 1)
    monkeypatch.setattr(streaming, "CHUNK", 40)
    big = torch.randn(3, 64 + 9 * 32 + 5, 64 + 7 * 32 + 19)
    with torch.no_grad():
        whole = fcn(big[None, :, :352, :288])
    torch.testing.assert_close(nofc.dense_predict(fcn, big, size), whole, rtol=0,
                               atol=1e-4 * float(whole.abs().max()))


def test_timm_dla_exports_to_onnx_with_free_height_and_width():
    # torch.onnx's own symbolic shapes fail on DLA's stride-2 branches; torch.export's work
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    size = (3, 64, 64)
    fcn = nofc.convert(timm.create_model("dla34", num_classes=4).eval(), size)
    proto = nofc.export_onnx(fcn, input_size=size)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    img = torch.randn(1, 3, 64 + 2 * 32, 64 + 3 * 32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": img.numpy()})[0]
    with torch.no_grad():
        ref = fcn(img).numpy()
    assert got.shape == ref.shape == (1, 4, 3, 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


# --------------------------------------------------------------------------- in place
# timm's NormFreeBlock with skipinit (the dm_nfnet_* models) does out.mul_(skipinit_gain)
# and ignores the result: conversion once dropped it as dead code (relative error 0.45)


def _skipinit(model):
    """Nonzero skipinit gains (timm starts them at 0), so each block's branch counts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.fill_(0.5)
    return model.eval()


def _verify_both(model, size):
    fcn = nofc.convert(model, size)
    assert [n for n in fcn.graph.nodes if n.op == "call_method" and n.target == "mul_"]
    r64 = nofc.verify(model, fcn, size, dtype=torch.float64)
    assert r64.ok and r64.max_rel_error <= 1e-10, r64
    r32 = nofc.verify(model, fcn, size, dtype=torch.float32)
    assert r32.ok and r32.max_rel_error <= 1e-4, r32


def test_normfree_skipinit_gain_is_kept():
    """timm's smallest NormFreeNet (test_nfnet) built with skipinit, as dm_nfnet_f0 is."""
    import dataclasses

    from timm.models.nfnet import NormFreeNet, model_cfgs

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfgs["test_nfnet"], skipinit=True)
    _verify_both(_skipinit(NormFreeNet(cfg, num_classes=10)), (3, 32, 32))


@pytest.mark.slow
def test_dm_nfnet_f0_skipinit_gain_is_kept():
    torch.manual_seed(0)
    model = _skipinit(timm.create_model("dm_nfnet_f0", pretrained=False))
    _verify_both(model, model.pretrained_cfg["input_size"])  # (3, 192, 192)
