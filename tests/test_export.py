import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.export import export_onnx, export_program, save_model


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("name", [pytest.param("vgg16", marks=pytest.mark.slow), "resnet18"])
def test_onnx_export_has_free_batch_height_width(name, tmp_path):
    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.get_model(name).eval(), (3, 224, 224))
    path = tmp_path / f"{name}.onnx"
    export_onnx(fcn, str(path), input_size=(3, 224, 224))
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    session = _session(path)
    del proto
    for batch, h, w, cells in [(2, 224, 224, (1, 1)), (1, 320, 288, (4, 3)),
                               (1, 448, 448, (8, 8))]:
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            ref = fcn(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape == (batch, 1000, *cells)
        assert _rel(ref, got) <= 1e-4, (name, h, w)


# Loads the saved model with nofc blocked (sys.modules entry None makes `import nofc` fail)
# from an isolated interpreter (-I: no user site, no PYTHON* variables, cwd not on sys.path).
_FRESH = """
import sys
sys.modules["nofc"] = None
try:
    import nofc
except ImportError:
    pass
else:
    raise SystemExit("nofc is importable")
import numpy as np, torch
path, kind = sys.argv[1], sys.argv[2]
model = torch.jit.load(path) if kind == "pt" else torch.export.load(path).module()
x = torch.from_numpy(np.load(sys.argv[3]))
with torch.no_grad():
    np.save(sys.argv[4], model(x).numpy())
"""


@pytest.fixture(scope="module")
def resnet64():
    torch.manual_seed(0)
    return nofc.convert(torchvision.models.resnet18().eval(), (3, 64, 64))


@pytest.mark.parametrize("suffix", ["pt", "pt2"])
def test_saved_model_runs_in_fresh_process_without_nofc(resnet64, suffix, tmp_path):
    path = tmp_path / f"fcn.{suffix}"
    kind = save_model(resnet64, str(path), input_size=(3, 64, 64))
    assert kind == {"pt": "TorchScript", "pt2": "torch.export"}[suffix]
    # 96 x 80 is neither the reference size nor the export example (128 x 128)
    x = torch.randn(3, 3, 96, 80)
    np.save(tmp_path / "x.npy", x.numpy())
    out = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(path), suffix,
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    # nofc's map: one cell per window inside (the network itself gives 2x2 here)
    ref = nofc.dense_predict(resnet64, x, (3, 64, 64)).numpy()
    with torch.no_grad():
        assert resnet64(x).shape[2:] == (2, 2)
    assert got.shape == ref.shape == (3, 1000, 2, 1)
    assert _rel(ref, got) <= 1e-5


def test_export_program_keeps_height_width_free(resnet64):
    ep = export_program(resnet64, input_size=(3, 64, 64))
    for shape, cells in [((1, 3, 64, 64), (1, 1)), ((2, 3, 160, 96), (4, 2))]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), resnet64(x), rtol=1e-5, atol=1e-5)
        assert ep.module()(x).shape == (shape[0], 1000, *cells)


def test_save_model_refuses_unknown_and_existing(resnet64, tmp_path):
    with pytest.raises(NofcError, match=r"unknown output format '.h5'.*\.pt2"):
        save_model(resnet64, str(tmp_path / "fcn.h5"), input_size=(3, 64, 64))
    taken = tmp_path / "fcn.onnx"
    taken.write_text("keep me")
    with pytest.raises(NofcError, match="exists"):
        save_model(resnet64, str(taken), input_size=(3, 64, 64))
    assert taken.read_text() == "keep me"
    with pytest.raises(NofcError, match="C, H, W"):
        export_onnx(resnet64, input_size=(64, 64))


def test_cli_writes_onnx_and_pt2(tmp_path, capsys):
    for suffix, kind in [("onnx", "ONNX"), ("pt2", "torch.export")]:
        out = tmp_path / f"lenet.{suffix}"
        assert main(["convert", "nofc:lenet5", "--input-size", "1x32x32", "-o", str(out)]) == 0
        assert f"({kind})" in capsys.readouterr().out
        assert out.is_file()
    y = _session(tmp_path / "lenet.onnx").run(None, {"input": np.zeros((2, 1, 40, 48),
                                                                        np.float32)})[0]
    assert y.shape == (2, 10, 3, 5)
    assert main(["convert", "nofc:lenet5", "--input-size", "1x32x32", "-o",
                 str(tmp_path / "lenet.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nofc: error: unknown output format") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx", "lenet.pt2"]


def test_onnx_that_onnxruntime_cannot_run_at_another_size_is_refused():
    """An exporter can size a Reshape for its example input (sequencer2d_s's LSTMs):
    onnx.checker passes it, onnxruntime fails at any other size. Refused, one line."""
    import onnx
    from onnx import TensorProto, helper

    from nofc.export import _check_in_onnxruntime

    pytest.importorskip("onnxruntime")
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 1, 32, 32])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["logits"])], "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 32, 32])], [shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    identity = torch.fx.symbolic_trace(torch.nn.Identity())
    example = torch.zeros(2, 1, 64, 64)
    with pytest.raises(NofcError, match=r"does not run in onnxruntime at 64x96 .*Reshape") as e:
        _check_in_onnxruntime(proto, identity, example, (1, 32, 32))
    assert "\n" not in str(e.value)
    # a model that runs but computes something else is refused too
    other = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    with pytest.raises(NofcError, match="gives other outputs than the converted network"):
        _check_in_onnxruntime(proto, other, example, (1, 32, 32))


def test_onnx_over_2_gib_goes_beside_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """Past protobuf's 2 GiB limit (regnet_y_128gf) the weights go to PATH.data: staged,
    checked, moved into place with the .onnx; the proto keeps its weights; an existing
    PATH.data is refused. Shown on LeNet-5 treated as large."""
    from nofc import export

    monkeypatch.setattr(export, "_large", lambda proto: True)
    fcn = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    proto = nofc.export_onnx(fcn, input_size=(1, 32, 32))
    path = tmp_path / "lenet.onnx"
    export.save_onnx(proto, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx", "lenet.onnx.data"]
    assert all(not t.external_data for t in proto.graph.initializer)  # whole again
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 40, 36)
    with torch.no_grad():
        want = fcn(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], want, rtol=0,
                               atol=1e-5 * np.abs(want).max())
    (tmp_path / "other.onnx.data").write_bytes(b"keep")
    with pytest.raises(NofcError, match="other.onnx.data"):
        export.save_onnx(proto, tmp_path / "other.onnx")
    assert (tmp_path / "other.onnx.data").read_bytes() == b"keep"
    assert not (tmp_path / "other.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lenet.onnx", "lenet.onnx.data", "other.onnx.data"]  # no staging folder left


def test_a_plain_fully_convolutional_module_exports_too():
    """Not only nofc's converted graphs: any fully convolutional nn.Module."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 28)).eval()
    proto = export_onnx(net, input_size=(1, 32, 32))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    assert export_program(net, input_size=(1, 32, 32)).module()(
        torch.randn(1, 1, 40, 36)).shape == (1, 3, 9, 5)
