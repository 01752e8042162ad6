"""engine=: the converted network run in onnxruntime / OpenVINO gives PyTorch's map."""

import pickle
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision

import nofc
from nofc import engines
from nofc.cli import main
from nofc.errors import NofcError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZE = (3, 64, 64)
LENET = (1, 32, 32)
INSTALLED = [e for e in ("onnxruntime", "openvino")
             if __import__("importlib").util.find_spec(e) is not None]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return nofc.convert(torchvision.models.resnet18().eval(), SIZE).eval()


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return nofc.convert(nofc.zoo.LeNet5().eval(), LENET).eval()


def _close(ref, got):
    assert got.shape == ref.shape and got.dtype == torch.float32
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= 1e-4 * scale, (err, scale)


@pytest.mark.parametrize("engine", INSTALLED)
def test_engine_map_is_the_eager_map(resnet18, engine):
    x = torch.randn(1, 3, 161, 130, generator=torch.Generator().manual_seed(1))
    _close(nofc.dense_predict(resnet18, x, SIZE),
           nofc.dense_predict(resnet18, x, SIZE, engine=engine))


@pytest.mark.parametrize("kwargs", [{"edges": "zeros"}, {"step": 2, "method": "shift"},
                                    {"batch_size": 1}])
def test_engine_runs_edges_shifts_and_batches(lenet, kwargs):
    x = torch.randn(2, 1, 67, 49, generator=torch.Generator().manual_seed(2))
    _close(nofc.dense_predict(lenet, x, LENET, **kwargs),
           nofc.dense_predict(lenet, x, LENET, engine="onnxruntime", **kwargs))


def test_engine_network_is_kept_made_again_and_pickles(lenet):
    x = torch.randn(2, 1, 70, 50)
    a = engines.on_engine(lenet, LENET, "onnxruntime")
    assert engines.on_engine(lenet, LENET, "onnxruntime") is a  # exported once
    assert a.geometry_for(LENET) == nofc.geometry(lenet, LENET)  # PyTorch's geometry
    _close(a(x), pickle.loads(pickle.dumps(a))(x))  # as a Dask worker receives it
    net = pickle.loads(pickle.dumps(lenet))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # new weights: a new export
    _close(nofc.dense_predict(net, x, LENET),
           nofc.dense_predict(net, x, LENET, engine="onnxruntime"))
    assert engines.on_engine(net, LENET, "onnxruntime") is not a


def test_a_wrong_engine_is_refused_before_use(lenet, monkeypatch):
    net = pickle.loads(pickle.dumps(lenet))  # its own cache
    real = engines._RUNNERS["onnxruntime"]
    monkeypatch.setitem(engines._RUNNERS, "onnxruntime",
                        lambda g, t, p: (lambda x, run=real(g, t, p): run(x) * 1.01))
    with pytest.raises(NofcError, match=r"engine 'onnxruntime' \(fp32\) gives other scores "
                                        "than the PyTorch network on a 40x44 image"):
        nofc.dense_predict(net, torch.randn(1, 40, 40), LENET, engine="onnxruntime")


@pytest.mark.parametrize("kwargs, match", [
    ({"engine": "tensorrt"}, "engine must be one of 'torch', 'onnxruntime', 'openvino'"),
    ({"precision": "bf16"}, "bfloat16 is not float32 \\(of the engines, only "
                            "engine='openvino' runs precision='bf16'\\): use engine='torch'"),
    ({"dtype": torch.float64}, "dtype=torch.float64 is not float32"),
    ({"step": 2, "method": "dilate"}, "a step finer than the stride runs the dilated"),
    ({"method": "crops", "step": 4}, "CropNet is not one"),
])
def test_refusals(lenet, kwargs, match):
    kwargs = {"engine": "onnxruntime", **kwargs}
    with pytest.raises(NofcError, match=match):
        nofc.dense_predict(lenet, torch.randn(1, 40, 40), LENET, **kwargs)


@pytest.mark.parametrize("engine, extra", [("onnxruntime", "onnx"), ("openvino", "engines")])
def test_an_engine_not_installed_names_its_extra(lenet, monkeypatch, engine, extra):
    monkeypatch.setitem(sys.modules, engine, None)  # import fails
    with pytest.raises(NofcError, match=rf"engine='{engine}' needs {engine}: pip install "
                                        rf"'nofc\[{extra}\]'"):
        nofc.dense_predict(lenet, torch.randn(1, 40, 40), LENET, engine=engine)


def test_tiles_on_an_engine_equal_the_eager_map(lenet):
    image = np.random.default_rng(0).random((1, 150, 130), dtype=np.float32)
    ref = nofc.dense_predict(lenet, image, LENET)[0]
    tiled = nofc.tiled_predict(lenet, image, LENET, tile=48, progress=False,
                               engine="onnxruntime")
    _close(ref, torch.from_numpy(np.asarray(tiled)))


def test_cli_engine_gives_the_eager_map(tmp_path):
    img = tmp_path / "page.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8)
                        ).save(img)
    maps = []
    for engine in ("torch", "onnxruntime"):
        torch.manual_seed(0)  # the same random weights for both runs
        scores = tmp_path / f"{engine}.npz"
        assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "-o",
                     str(tmp_path / "h.png"), "--scores", str(scores), "--force",
                     "--engine", engine]) == 0
        maps.append(torch.from_numpy(np.load(scores)["scores"]))
    _close(*maps)


@pytest.mark.skipif("openvino" not in INSTALLED, reason="openvino is not installed")
def test_openvino_bf16_is_the_float32_map_to_bfloat16s_tolerance(resnet18):
    """precision="bf16" with engine="openvino": OpenVINO's bfloat16 pass (float32 scores),
    against PyTorch's float32 map and PyTorch's own bf16 pass."""
    x = torch.randn(1, 3, 160, 144, generator=torch.Generator().manual_seed(1))
    ref = nofc.dense_predict(resnet18, x, SIZE)
    got = nofc.dense_predict(resnet18, x, SIZE, engine="openvino", precision="bf16")
    assert got.shape == ref.shape and got.dtype == torch.float32
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 5e-2 * scale
    assert nofc.precision.agreement(ref, got)["same_top"] >= 0.9
    fp32 = nofc.dense_predict(resnet18, x, SIZE, engine="openvino")
    assert float((fp32 - ref).abs().max()) <= 1e-4 * scale  # another network, not the bf16 one
    assert float((got - fp32).abs().max()) > 0  # the bf16 pass really ran in bfloat16


def test_precision_auto_is_never_refused_on_an_engine(lenet):
    """"auto" is float32 on onnxruntime (no bfloat16 pass there) and OpenVINO's choice of
    bf16 where the CPU has bfloat16 units; "bf16" itself stays refused on onnxruntime."""
    import warnings

    x = torch.randn(1, 40, 44)
    ref = nofc.dense_predict(lenet, x, LENET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" says once what it picked
        got = nofc.dense_predict(lenet, x, LENET, engine="onnxruntime", precision="auto")
        _close(ref, got)
        tiled = nofc.tiled_predict(lenet, x.numpy(), LENET, tile=48, progress=False,
                                   engine="onnxruntime", precision="auto")
        _close(ref[0], torch.from_numpy(np.asarray(tiled)))
        if "openvino" in INSTALLED:
            ov = nofc.dense_predict(lenet, x, LENET, engine="openvino", precision="auto")
            assert float((ov - ref).abs().max()) <= 5e-2 * float(ref.abs().max())
    with pytest.raises(NofcError, match="only engine='openvino' runs precision='bf16'"):
        nofc.dense_predict(lenet, x, LENET, engine="onnxruntime", precision="bf16")
