"""ONNX all the way (issue 23, point 4): an ONNX classifier straight into dense and tiled
maps, run in onnxruntime, with the PyTorch path's maps and geometry as the reference."""

import contextlib
import io
import pickle
import warnings

import numpy as np
import onnx
import pytest
import timm
import torch
import torchvision
import zarr
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import nofc
from nofc import NofcError
from nofc._fx import dumps, loads
from nofc.cli import main
from nofc.onnx_net import OnnxNet, is_onnx, onnx_geometry

SIZE = (3, 64, 64)


def _export(model, path=None, *, dynamo: bool):
    """Export as a user would (both exporters), batch free."""
    x = torch.randn(1, *SIZE)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(model.eval(), (x,), f, dynamo=False, input_names=["image"],
                              dynamic_axes={"image": {0: "n"}})
            proto = onnx.load_from_string(f.getvalue())
    if path is not None:
        onnx.save(proto, str(path))
    return proto


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(name, torch model, path of its ONNX export): torchvision (dynamo exporter) and
    timm (TorchScript exporter)."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    tm = timm.create_model("resnet18").eval()
    _export(tv, d / "tv.onnx", dynamo=True)
    _export(tm, d / "timm.onnx", dynamo=False)
    return {"torchvision": (tv, d / "tv.onnx"), "timm": (tm, d / "timm.onnx")}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("which", ["torchvision", "timm"])
def test_geometry_read_from_the_graph_is_pytorchs(nets, which):
    model, path = nets[which]
    onnx_geo = OnnxNet(path).converted(SIZE).geometry_for(SIZE)
    torch_geo = nofc.geometry(nofc.convert(model, SIZE), SIZE)
    for field in ("stride", "offset", "window", "exact", "receptive_field", "rf_offset",
                  "lattice"):
        assert getattr(onnx_geo, field) == getattr(torch_geo, field), field
    assert not onnx_geo.exact and "pads its input" in onnx_geo.reasons[0]
    for hw in ((64, 64), (97, 130), (200, 71)):
        assert onnx_geo.network_shape(hw) == torch_geo.network_shape(hw)


def test_squeeze_excitation_is_global_context(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    proto = _export(model, dynamo=False)
    geo = OnnxNet(proto).converted(SIZE).geometry_for(SIZE)
    ref = nofc.geometry(nofc.convert(model, SIZE), SIZE)
    assert (geo.stride, geo.receptive_field, geo.rf_offset) == \
        (ref.stride, ref.receptive_field, ref.rf_offset)
    assert geo.global_context and ref.global_context and not geo.exact
    with pytest.raises(NofcError, match="global context inside its body"):
        nofc.tiled_predict(proto, np.zeros((3, 200, 200), np.float32),
                           SIZE, tile=96, progress=False)


@pytest.mark.parametrize("which", ["torchvision", "timm"])
def test_dense_predict_of_an_onnx_file_is_the_pytorch_map(nets, which):
    model, path = nets[which]
    x = torch.randn(2, 3, 150, 171, generator=torch.Generator().manual_seed(1))
    ref = nofc.dense_predict(nofc.convert(model, SIZE), x, SIZE)
    got = nofc.dense_predict(str(path), x, SIZE)
    assert got.shape == ref.shape == (2, 1000, 3, 4)
    assert _rel(ref, got) <= 1e-4
    if which == "timm":  # a finer step: shift-and-stitch, 4 passes
        small = x[:1, :, :100, :100]
        with pytest.warns(UserWarning, match="shift-and-stitch: the ONNX model runs as it is "
                                             "in onnxruntime"):
            fine = nofc.dense_predict(onnx.load(str(path)), small, SIZE, step=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own note on its padded layers
            ref = nofc.dense_predict(nofc.convert(model, SIZE), small, SIZE, step=16)
        assert fine.shape == ref.shape == (1, 1000, 3, 3) and _rel(ref, fine) <= 1e-4


def test_tiled_predict_of_an_onnx_file_is_the_pytorch_map(nets, tmp_path):
    model, path = nets["torchvision"]
    img = np.random.default_rng(0).random((3, 300, 260)).astype(np.float32)
    ref = nofc.tiled_predict(nofc.convert(model, SIZE), img, SIZE, tile=128, progress=False)
    got = nofc.tiled_predict(str(path), img, SIZE, tile=128, progress=False,
                             out=tmp_path / "m.zarr")
    assert got.shape == ref.shape == (1000, 8, 7)
    assert _rel(ref, np.asarray(got)) <= 1e-4
    # the store knows which graph made it: another graph's run is refused, not mixed in
    _, other = nets["timm"]
    with pytest.raises(NofcError, match="other arguments|different|made with"):
        nofc.tiled_predict(str(other), img, SIZE, tile=128, progress=False,
                           out=tmp_path / "m.zarr")


def test_the_network_travels_to_workers(nets):
    net = OnnxNet(nets["timm"][1]).converted(SIZE)
    x = torch.randn(2, 3, 90, 100)
    want = net(x)
    assert torch.equal(pickle.loads(pickle.dumps(net))(x), want)
    assert torch.equal(loads(dumps(net))(x), want)  # as tiling ships it to Dask workers
    assert net.digest.shape == (32,)


def test_cli_heatmap_reads_an_onnx_file(nets, tmp_path, capsys):
    model, path = nets["torchvision"]
    img = (np.random.default_rng(2).random((140, 180, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    # no --input-size: the graph's input shape is static apart from the batch
    assert main(["heatmap", str(path), str(tmp_path / "img.png"), "-o",
                 str(tmp_path / "h.png"), "--scores", str(tmp_path / "s.npz"),
                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 0
    scores = np.load(tmp_path / "s.npz")["scores"]
    x = torch.from_numpy((img.transpose(2, 0, 1) / 255.0 - 0.5) / 0.25).float()
    ref = nofc.dense_predict(nofc.convert(model, SIZE), x, SIZE)[0].numpy()
    assert scores.shape == ref.shape and _rel(ref, scores) <= 1e-4
    assert (tmp_path / "h.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["heatmap", str(path), str(tmp_path / "img.png"), "-o",
                 str(tmp_path / "h2.png"), "--num-classes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX model with its own weights" in err[0]
    assert not (tmp_path / "h2.png").exists()


def _graph(nodes, inits, out_dims, in_dims=("n", 1, 8, 8)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     list(in_dims))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_head_convert_onnx_refuses_is_mapped_crop_by_crop():
    """A head that reads one position of the map (a class token, here pixel (0, 0)) has no
    fully convolutional form: "auto" runs the classifier on every window, with a note."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((4, 3)).astype(np.float32)
    token = _graph([helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
                    helper.make_node("Gather", ["c", "zero"], ["r"], axis=2),
                    helper.make_node("Gather", ["r", "zero"], ["t"], axis=2),
                    helper.make_node("MatMul", ["t", "fc"], ["y"])],
                   {"w": w, "fc": fc, "zero": np.array(0, np.int64)}, ["n", 3])
    x = torch.randn(1, 1, 20, 17)
    with pytest.warns(UserWarning, match="crop by crop"):
        got = nofc.dense_predict(token, x, (1, 8, 8), step=4)
    classifier = OnnxNet(token)
    ref = nofc.sliding_window_predict(classifier, x, (1, 8, 8), step=4)
    assert got.shape == ref.shape == (1, 3, 4, 3)
    assert _rel(ref, got) <= 1e-6
    with pytest.raises(NofcError, match="Gather"):
        nofc.dense_predict(token, x, (1, 8, 8), method="dilate")


def test_exact_geometry_is_checked_on_crops():
    net = OnnxNet(nofc.onnx_net.example_classifier()).converted((1, 8, 8))
    geo = onnx_geometry(net, (1, 8, 8))
    assert geo.exact and geo.stride == (1, 1) and geo.receptive_field == (8, 8)
    x = torch.randn(1, 1, 14, 12)
    ref = nofc.sliding_window_predict(OnnxNet(nofc.onnx_net.example_classifier()), x, (1, 8, 8),
                                      step=1)
    assert _rel(ref, nofc.dense_predict(net, x, (1, 8, 8))) <= 1e-5


def test_a_graph_nofc_cannot_read_is_one_line():
    w = np.ones((2, 1, 3, 3), np.float32)
    resize = _graph([helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
                     helper.make_node("Resize", ["c", "", "scales"], ["y"])],
                    {"w": w, "scales": np.array([1, 1, 2, 2], np.float32)},
                    ["n", 2, "h", "w"])
    with pytest.raises(NofcError, match=r"^cannot read the geometry of the ONNX graph: .*"
                                        r"\(Resize\)") as e:
        nofc.dense_predict(resize, torch.zeros(1, 1, 16, 16), (1, 6, 6))
    assert "\n" not in str(e.value)
    net = OnnxNet(nofc.onnx_net.example_classifier()).converted((1, 8, 8))
    with pytest.raises(NofcError, match="runs in float32"):
        net(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    assert is_onnx("a.ONNX") and is_onnx(resize) and not is_onnx("a.pt")


FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "onnx"


@pytest.mark.parametrize("name", ["gray_functional_gap", "rgb_functional_flatten"])
def test_keras_tf2onnx_graph_maps_as_keras_predicts(name):
    """A trained Keras model exported by tf2onnx (channels-last input): its map from the
    .onnx file, run whole and in tiles, equals Keras's own predictions on every crop."""
    ref = np.load(FIXTURES / f"{name}.npz")
    size = tuple(int(v) for v in ref["input_size"])
    page = ref["page"].transpose(2, 0, 1).astype(np.float32) / 255  # (C, H, W)
    path = FIXTURES / f"{name}.onnx"
    net = OnnxNet(path)
    assert net.layout == "nhwc" and net.input_size() == size
    fcn = net.converted(size)
    assert fcn.geometry_for(size).stride == (int(ref["stride"]),) * 2
    dense = nofc.dense_predict(str(path), torch.from_numpy(page), size)[0].numpy()
    np.testing.assert_allclose(dense, ref["scores"], rtol=1e-4, atol=2e-5)
    tiled = nofc.tiled_predict(str(path), page, size, tile=24, progress=False)
    np.testing.assert_allclose(tiled, ref["scores"], rtol=1e-4, atol=2e-5)
