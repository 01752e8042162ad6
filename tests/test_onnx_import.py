import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from onnx import TensorProto, helper, numpy_helper

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.onnx_import import convert_onnx, verify_onnx


def _export(model, x, *, dynamo: bool, **kwargs) -> onnx.ModelProto:
    """Export like a user would: the new dynamo exporter or the TorchScript-based one."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False,
                                     **kwargs).model_proto
        f = io.BytesIO()
        torch.onnx.export(model.eval(), (x,), f, dynamo=False, **kwargs)
        return onnx.load_from_string(f.getvalue())


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(m, x: np.ndarray) -> np.ndarray:
    s = _session(m)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _sliding(m, x: np.ndarray, size, stride: int, *, nhwc: bool = False) -> np.ndarray:
    """The classifier run crop by crop: (B, K, rows, cols), the definition of the map.

    ``x`` is (B, C, H, W); with ``nhwc`` each crop is fed as (1, h, w, C).
    """
    s = _session(m)
    name = s.get_inputs()[0].name
    _, h, w = size
    rows, cols = (x.shape[2] - h) // stride + 1, (x.shape[3] - w) // stride + 1

    def crop(b, i, j):
        c = x[b:b + 1, :, i * stride:i * stride + h, j * stride:j * stride + w]
        return c.transpose(0, 2, 3, 1).copy() if nhwc else c

    cells = [[np.concatenate([s.run(None, {name: crop(b, i, j)})[0]
                              for b in range(x.shape[0])])
              for j in range(cols)] for i in range(rows)]
    return np.stack([np.stack(r, axis=-1) for r in cells], axis=-2)  # (B, K, rows, cols)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


class ChannelsLastNet(nn.Module):
    """Flattens in H, W, C order like a Keras model: permute(0, 2, 3, 1) then flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 6, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6 * 5 * 5, 20), nn.ReLU(), nn.Dropout(),
                                  nn.Linear(20, 10), nn.LogSoftmax(dim=1))

    def forward(self, x):
        x = self.features(x).permute(0, 2, 3, 1).flatten(1)  # (B, 5*5*6) in HWC order
        return self.head(x)


SIZE = (3, 16, 16)  # ChannelsLastNet's reference size; its network stride is 2


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-reshape", "legacy-flatten"])
def test_channels_last_flatten_matches_sliding_window(dynamo, tmp_path):
    torch.manual_seed(0)
    original = _export(ChannelsLastNet(), torch.randn(1, *SIZE), dynamo=dynamo)
    ops = [n.op_type for n in original.graph.node]
    assert "Transpose" in ops and ("Reshape" if dynamo else "Flatten") in ops
    out = tmp_path / "fcn.onnx"
    fcn = convert_onnx(original, SIZE, output=str(out))
    loaded = onnx.load(str(out))
    onnx.checker.check_model(loaded, full_check=True)
    assert {n.op_type for n in loaded.graph.node}.isdisjoint({"Gemm", "MatMul", "Flatten",
                                                               "Reshape", "Transpose"})
    x = np.random.default_rng(0).standard_normal((2, 3, 22, 20)).astype(np.float32)
    dense = _run(loaded, x)
    assert dense.shape == (2, 10, 4, 3)
    ref = _sliding(original, x, SIZE, stride=2)
    assert _rel(ref, dense) <= 1e-5
    assert verify_onnx(original, fcn, SIZE).ok
    assert os.listdir(tmp_path) == ["fcn.onnx"]


def test_channels_last_kernel_is_permuted():
    """The first Conv's kernel is the Linear weight read in (out, H, W, C) order."""
    torch.manual_seed(0)
    net = ChannelsLastNet()
    fcn = convert_onnx(_export(net, torch.randn(1, *SIZE), dynamo=False), SIZE)
    first = next(n for n in fcn.graph.node if n.name == "node_Gemm_5" or
                 n.output[0] == "/head/head.0/Gemm_output_0")  # the first dense layer
    kernel = numpy_helper.to_array(next(t for t in fcn.graph.initializer
                                        if t.name == first.input[1]))
    w = net.head[0].weight.detach().numpy()
    np.testing.assert_array_equal(kernel, w.reshape(20, 5, 5, 6).transpose(0, 3, 1, 2))
    assert not np.array_equal(kernel, w.reshape(20, 6, 5, 5))


def _hand_graph(opset=17, *, transpose_then_relu=True, head_extra=None, gemm_attrs=None,
                nhwc_input=False):
    """Conv (stride 2) -> Transpose to NHWC -> Relu -> Reshape -> MatMul + Add -> Tanh ->
    Gemm (transB=0, alpha, beta) -> Mul by a per-class constant -> PRelu -> Softmax.

    ``nhwc_input``: the graph takes N x H x W x C and transposes it first (tf2onnx style).
    """
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(f32), "cw"),
        numpy_helper.from_array(rng.standard_normal(5).astype(f32), "cb"),
        numpy_helper.from_array(np.array([-1, 4 * 4 * 5], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((80, 12)).astype(f32) * 0.2, "w1"),
        numpy_helper.from_array(rng.standard_normal(12).astype(f32), "b1"),
        numpy_helper.from_array(rng.standard_normal((12, 7)).astype(f32), "w2"),
        numpy_helper.from_array(rng.standard_normal((1, 7)).astype(f32), "b2"),
        numpy_helper.from_array(rng.standard_normal(7).astype(f32), "scale"),
        numpy_helper.from_array(np.full(7, 0.1, f32), "slope"),
    ]
    attrs = {"transB": 0, "alpha": 0.5, "beta": 2.0, **(gemm_attrs or {})}
    nodes = [
        helper.make_node("Conv", ["xc" if nhwc_input else "x", "cw", "cb"], ["c"], name="conv",
                         strides=[2, 2]),
        helper.make_node("Transpose", ["c"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["t"], ["r"], name="relu") if transpose_then_relu else
        helper.make_node("Identity", ["t"], ["r"], name="same"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["m1"], name="dense1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="dense1_bias"),
        helper.make_node("Tanh", ["a1"], ["h1"], name="tanh"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["g2"], name="dense2", **attrs),
        helper.make_node("Mul", ["g2", "scale"], ["s2"], name="scale_classes"),
        helper.make_node("PRelu", ["s2", "slope"], ["p2"], name="prelu"),
        helper.make_node("Softmax", ["p2"], ["y"], name="softmax", axis=-1),
    ] + (head_extra or [])
    if nhwc_input:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xc"], name="to_nchw",
                                         perm=[0, 3, 1, 2]))
    out = head_extra[-1].output[0] if head_extra else "y"
    kind = TensorProto.INT64 if head_extra else TensorProto.FLOAT
    g = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 9, 9, 3] if nhwc_input else ["N", 3, 9, 9])],
        [helper.make_tensor_value_info(out, kind, ["N", None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("between", [True, False], ids=["relu-after-transpose", "direct"])
def test_matmul_add_and_gemm_transb0_alpha_beta(between):
    original = _hand_graph(transpose_then_relu=between)
    onnx.checker.check_model(original)
    fcn = convert_onnx(original, (3, 9, 9))
    ops = [n.op_type for n in fcn.graph.node]
    assert ops.count("Conv") == 3 and "MatMul" not in ops and "Gemm" not in ops
    x = np.random.default_rng(2).standard_normal((2, 3, 13, 11)).astype(np.float32)
    dense = _run(fcn, x)
    assert dense.shape == (2, 7, 3, 2)
    assert _rel(_sliding(original, x, (3, 9, 9), stride=2), dense) <= 1e-5
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-5)  # softmax over classes


@pytest.mark.parametrize("name,dynamo", [
    ("resnet18", True),  # ReduceMean (keepdims) + Reshape + Gemm
    ("resnet18", False),  # GlobalAveragePool + Flatten + Gemm
    ("squeezenet1_0", False),  # no Gemm: Conv, GlobalAveragePool, Flatten is the output
    ("mobilenet_v3_small", False),  # squeeze-excitation pools stay global in the body
], ids=["resnet18-dynamo", "resnet18-legacy", "squeezenet1_0-legacy",
        "mobilenet_v3_small-legacy"])
def test_torchvision_onnx_matches_nofc_convert(name, dynamo):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    size = (3, 64, 64)
    original = _export(model, torch.randn(1, *size), dynamo=dynamo)
    fcn = convert_onnx(original, size)
    assert verify_onnx(original, fcn, size).ok
    x = torch.randn(1, 3, 96, 128)
    dense = _run(fcn, x.numpy())
    with torch.no_grad():
        ref = nofc.convert(model, size)(x).numpy()  # the PyTorch conversion, same math
        logits = model(x).numpy()
    assert dense.shape == ref.shape and dense.shape[2:] == {"squeezenet1_0": (3, 5)}.get(
        name, (2, 3))
    assert _rel(ref, dense) <= 1e-4
    if name == "resnet18":  # pooling="global" keeps the image-level classifier
        glob = convert_onnx(original, size, pooling="global")
        assert _rel(logits, _run(glob, x.numpy())[:, :, 0, 0]) <= 1e-4


def test_channels_last_input_graph():
    """tf2onnx-style: N x H x W x C input, Transpose to NCHW, ..., Transpose back, flatten."""
    original = _hand_graph(nhwc_input=True)
    fcn = convert_onnx(original, (3, 9, 9))
    dims = [d.dim_param or d.dim_value for d in fcn.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", "height", "width", 3]
    x = np.random.default_rng(3).standard_normal((1, 3, 13, 15)).astype(np.float32)
    dense = _run(fcn, x.transpose(0, 2, 3, 1).copy())
    assert dense.shape == (1, 7, 3, 4)
    assert _rel(_sliding(original, x, (3, 9, 9), stride=2, nhwc=True), dense) <= 1e-5
    assert verify_onnx(original, fcn, (3, 9, 9), batch=2).ok


def _keras_gap_graph():
    """Conv -> Transpose to NHWC -> ReduceMean over axes 1, 2 (GlobalAveragePooling2D) ->
    Gemm: the pooling and the flatten are one node, on a channels-last tensor."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("cw", (6, 3, 3, 3)), ("w", (4, 6)), ("b", (4,))]]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Transpose", ["c"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("ReduceMean", ["t"], ["gap"], name="gap", axes=[1, 2],
                              keepdims=0),
             helper.make_node("Gemm", ["gap", "w", "b"], ["y"], name="dense", transB=1)]
    g = helper.make_graph(nodes, "keras_gap", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_last_global_average_pool():
    original = _keras_gap_graph()
    x = np.random.default_rng(5).standard_normal((2, 3, 13, 11)).astype(np.float32)
    dense = _run(convert_onnx(original, (3, 9, 9)), x)
    assert dense.shape == (2, 4, 3, 2)
    assert _rel(_sliding(original, x, (3, 9, 9), stride=2), dense) <= 1e-5
    glob = _run(convert_onnx(original, (3, 9, 9), pooling="global"), x)
    assert glob.shape == (2, 4, 1, 1)
    assert _rel(_run(original, x), glob[:, :, 0, 0]) <= 1e-5


def test_body_that_fixes_the_size_is_refused():
    """A Reshape with a constant shape in the body: exact at the reference size only."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("cw", (5, 3, 3, 3)), ("pw", (5, 5, 1, 1)), ("w", (80, 7))]]
    inits.append(numpy_helper.from_array(np.array([-1, 5, 4, 4], np.int64), "shape"))
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="fixed_reshape"),
             helper.make_node("Conv", ["r", "pw"], ["p"], name="pointwise"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])], inits)
    msg = _error(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert "3x18x18" in msg and "fixes the size" in msg


def test_result_runs_without_torch(tmp_path):
    path = tmp_path / "fcn.onnx"
    convert_onnx(_hand_graph(), (3, 9, 9), output=str(path))
    code = ("import sys; sys.modules['torch'] = None; sys.modules['nofc'] = None\n"
            "import numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
            "y = s.run(None, {'x': np.zeros((1, 3, 15, 17), np.float32)})[0]\n"
            "print(y.shape)\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 7, 4, 5)"


def test_dims_are_named_and_free():
    fcn = convert_onnx(_hand_graph(), (3, 9, 9))
    dims = [[d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in (fcn.graph.input[0], fcn.graph.output[0])]
    assert dims == [["N", 3, "height", "width"], ["N", 7, "map_height", "map_width"]]


def _error(model, size=(3, 9, 9), **kw) -> str:
    with pytest.raises(NofcError) as info:
        convert_onnx(model, size, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unconvertible_head_node_is_named():
    argmax = helper.make_node("ArgMax", ["y"], ["cls"], name="pick_class", axis=1)
    msg = _error(_hand_graph(head_extra=[argmax]))
    assert "'pick_class' (ArgMax)" in msg


def test_gemm_transa_refused():
    msg = _error(_hand_graph(gemm_attrs={"transA": 1}))
    assert "'dense2' (Gemm)" in msg and "transA" in msg


def test_softmax_before_opset13_refused():
    msg = _error(_hand_graph(opset=11))
    assert "'softmax' (Softmax)" in msg and "opset" in msg


def test_wrong_input_size():
    assert "has channels 3, but input_size says 1" in _error(_hand_graph_static(), (1, 9, 9))
    free = _hand_graph()
    for d, name in zip(free.graph.input[0].type.tensor_type.shape.dim[2:], "HW"):
        d.dim_param = name
    msg = _error(free, (3, 11, 11))
    assert "'flatten' (Reshape)" in msg and "5x5x5" in msg
    free.graph.node[3].CopyFrom(helper.make_node("Flatten", ["r"], ["flat"], name="flatten"))
    msg = _error(free, (3, 11, 11))
    assert "'dense1' (MatMul)" in msg and "80 features" in msg and "5x5x5" in msg


def _hand_graph_static():
    m = _hand_graph()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return m


def test_no_head_and_bad_files(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    assert "found no Flatten" in _error(helper.make_model(g), (3, 8, 8))
    assert "not found" in _error(str(tmp_path / "missing.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    assert "cannot read" in _error(str(junk))
    out = tmp_path / "taken.onnx"
    out.write_text("keep me")
    assert "exists" in _error(_hand_graph(), output=str(out))
    assert out.read_text() == "keep me"
    assert _error(_hand_graph(), pooling="mean") == \
        "pooling must be 'window' or 'global', got 'mean'"


def test_cli_converts_onnx_file(tmp_path, capsys):
    src, dst = tmp_path / "clf.onnx", tmp_path / "fcn.onnx"
    onnx.save(_hand_graph(), str(src))
    assert main(["convert", str(src), "--input-size", "3x9x9", "-o", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and str(dst) in out
    assert _run(onnx.load(str(dst)), np.zeros((1, 3, 11, 11), np.float32)).shape == (1, 7, 2, 2)
    assert main(["convert", str(src), "--input-size", "3x9x9", "-o", str(dst)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(src), "--input-size", "3x9x9", "-o",
                 str(tmp_path / "fcn.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nofc: error:") and ".onnx" in err and err.count("\n") == 1
    bad = tmp_path / "bad.onnx"
    onnx.save(_hand_graph(head_extra=[helper.make_node("ArgMax", ["y"], ["cls"], name="am")]),
              str(bad))
    assert main(["convert", str(bad), "--input-size", "3x9x9", "-o",
                 str(tmp_path / "bad_fcn.onnx")]) == 2
    assert "'am' (ArgMax)" in capsys.readouterr().err
    assert not (tmp_path / "bad_fcn.onnx").exists()


def _head_graph(head, inits, outputs=("y",)):
    """Conv (stride 2) to a 5 x 4 x 4 map at 3 x 9 x 9 -> Flatten 'f' -> ``head`` nodes."""
    rng = np.random.default_rng(7)
    arrays = {"cw": rng.standard_normal((5, 3, 3, 3)), **inits}
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"), *head]
    g = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", None]) for o in outputs],
        [numpy_helper.from_array(np.asarray(a, np.int64 if isinstance(a, list) else np.float32), n)
         for n, a in arrays.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_class_score_ops_become_per_channel():
    """BatchNormalization, Reshape, PRelu, Clip and a per-class Sum on the class scores."""
    rng = np.random.default_rng(8)
    k = 4
    head = [helper.make_node("Gemm", ["f", "w", "b"], ["g"], name="fc", transB=1),
            helper.make_node("BatchNormalization", ["g", "s", "b", "mu", "v"], ["bn"], name="bn"),
            helper.make_node("Reshape", ["bn", "shape"], ["rs"], name="same_shape"),
            helper.make_node("PRelu", ["rs", "slope"], ["pr"], name="prelu"),
            helper.make_node("Clip", ["pr", "lo", ""], ["cl"], name="clip"),
            helper.make_node("Sum", ["cl", "rs", "per_class"], ["y"], name="sum")]
    inits = {"w": rng.standard_normal((k, 80)) * 0.1, "b": rng.standard_normal(k),
             "s": rng.uniform(0.5, 2, k), "mu": rng.standard_normal(k), "v": np.ones(k),
             "slope": np.full(k, 0.2), "lo": np.array(-1.0),
             "per_class": rng.standard_normal((1, k))}
    original = _head_graph(head, inits)
    original.graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64),
                                                              "shape"))
    fcn = convert_onnx(original, (3, 9, 9))
    assert [n.op_type for n in fcn.graph.node] == [
        "Conv", "Conv", "BatchNormalization", "Identity", "PRelu", "Clip", "Sum"]
    x = np.random.default_rng(9).standard_normal((2, 3, 13, 11)).astype(np.float32)
    dense = _run(fcn, x)
    assert dense.shape == (2, k, 3, 2)
    assert _rel(_sliding(original, x, (3, 9, 9), stride=2), dense) <= 1e-5


_W = {"w": np.ones((4, 80))}


@pytest.mark.parametrize("head,inits,message", [
    ([helper.make_node("Mul", ["f", "s"], ["m"], name="mul"),
      helper.make_node("Gemm", ["m", "w"], ["y"], name="fc", transB=1)], {**_W, "s": np.ones(80)},
     ("ONNX node 'mul' (Mul): its constant 's' has shape (80,); nofc handles scalars and one "
      "value per feature of the class scores")),
    ([helper.make_node("Softmax", ["f"], ["y"], name="sm")], {},
     "ONNX node 'sm' (Softmax): it runs on the flattened feature map, not on class scores"),
    ([helper.make_node("BatchNormalization", ["f", "v", "v", "v", "v"], ["y"], name="bn")],
     {"v": np.ones(80)},
     ("ONNX node 'bn' (BatchNormalization): it normalises the flattened feature map feature "
      "by feature")),
    ([helper.make_node("Relu", ["f"], ["y"], name="relu")], {},
     ("the graph output 'y' is the flattened feature map itself, which has no convolutional "
      "form")),
    ([helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)],
     {**_W, "b": np.ones((2, 4))},
     "ONNX node 'fc' (Gemm): its bias has shape (2, 4); nofc needs one value per output (4,)"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Gemm", ["g", "w2"], ["y"], name="fc2", transB=1)],
     {**_W, "w2": np.ones((3, 5))}, "ONNX node 'fc2' (Gemm): it expects 5 features but gets 4"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Softmax", ["g"], ["y"], name="sm", axis=0)], _W,
     "ONNX node 'sm' (Softmax): it does not run over the class axis"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Clip", ["g", "lo", ""], ["y"], name="clip")], {**_W, "lo": np.ones(4)},
     "ONNX node 'clip' (Clip): its extra inputs are not scalar constants"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Add", ["g", "x"], ["y"], name="add")], _W,
     "ONNX node 'add' (Add): its input 'x' is neither constant nor from the head"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Reshape", ["g", "shape"], ["y"], name="split")],
     {**_W, "shape": [-1, 2, 2]},
     "ONNX node 'split' (Reshape): it changes the shape of the class scores"),
    ([helper.make_node("Unsqueeze", ["f", "axes"], ["u"], name="unsq"),
      helper.make_node("Reshape", ["u", "shape"], ["y"], name="fold")],
     {"axes": [2], "shape": [-1, 5, 16]},
     "ONNX node 'fold' (Reshape): it changes the shape of the flattened feature map"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsq"),
      helper.make_node("Softmax", ["u"], ["y"], name="sm", axis=1)], {**_W, "axes": [1]},
     "ONNX node 'sm' (Softmax): it does not run over the class axis"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsq"),
      helper.make_node("BatchNormalization", ["u", "v", "v", "v", "v"], ["y"], name="bn")],
     {**_W, "axes": [1], "v": np.ones(1)},
     "ONNX node 'bn' (BatchNormalization): its channel axis 1 does not hold the class scores"),
    ([helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
      helper.make_node("Mul", ["g", "s"], ["y"], name="mul")], {**_W, "s": np.ones((4, 1))},
     ("ONNX node 'mul' (Mul): its constant 's' has shape (4, 1); nofc handles scalars and one "
      "value per feature of the class scores")),
], ids=["map-per-feature-mul", "map-softmax", "map-batchnorm", "map-output", "bias-shape",
        "feature-count", "softmax-axis", "clip-bounds", "add-body-tensor", "scores-reshape",
        "map-reshape", "softmax-axis-size-1", "batchnorm-axis-size-1", "per-class-column"])
def test_head_node_without_map_form_is_refused(head, inits, message):
    assert _error(_head_graph(head, inits)) == message


def test_initializers_listed_as_inputs_leave_size_free():
    """Old exports list initializers as graph inputs; the converted input must stay free."""
    original = _head_graph([helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)],
                           _W)
    for t in original.graph.initializer:
        original.graph.input.append(helper.make_tensor_value_info(
            t.name, TensorProto.FLOAT, list(t.dims)))
    fcn = convert_onnx(original, (3, 9, 9))
    assert [i.name for i in fcn.graph.input] == ["x", "cw"]
    dims = [d.dim_param or d.dim_value for d in fcn.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "height", "width"]
    assert _run(fcn, np.zeros((1, 3, 13, 11), np.float32)).shape == (1, 4, 3, 2)


# ------------------------------------------------------------- what real exporters write

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "onnx"
KERAS = ["gray_functional_gap", "gray_sequential_flatten", "rgb_functional_flatten",
         "rgb_sequential_gap"]  # made by tests/fixtures/make_keras_onnx.py (TensorFlow)


def test_keras_fixtures_are_all_there():
    assert sorted(p.stem for p in FIXTURES.glob("*.onnx")) == KERAS
    assert sorted(p.stem for p in FIXTURES.glob("*.npz")) == KERAS


@pytest.mark.parametrize("name", KERAS)
def test_keras_tf2onnx_map_equals_keras_on_every_crop(name):
    """tf2onnx's graph of a trained Keras model, converted: every cell of the map on a test
    page equals what Keras itself predicted for that crop (stored with the fixture)."""
    ref = np.load(FIXTURES / f"{name}.npz")
    size = tuple(int(v) for v in ref["input_size"])
    original = onnx.load(str(FIXTURES / f"{name}.onnx"))
    fcn = convert_onnx(original, size)
    page = ref["page"][None].astype(np.float32) / 255  # (1, H, W, C): Keras is channels-last
    dense = _run(fcn, page)[0]  # (K, rows, cols)
    np.testing.assert_allclose(dense, ref["scores"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dense.sum(axis=0), 1.0, rtol=1e-5)  # softmax over classes
    dims = [d.dim_param or d.dim_value for d in fcn.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == ["height", "width", size[0]]
    if size[0] == 1:  # the NHWC -> NCHW "Reshape" to [-1, 1, 16, 16] is a Transpose again
        first = next(n for n in original.graph.node if n.input[0] == "image")
        assert first.op_type == "Reshape"
        assert [n.op_type for n in fcn.graph.node if n.input[0] == "image"] == ["Transpose"]


class GrayView(nn.Module):
    """Flattens with x.view(x.size(0), -1) (Shape/Gather/Concat/Reshape when the batch is
    dynamic) and returns (N, K, 1, 1) scores through Unsqueezes after the Gemm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3), nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Dropout(),
                                nn.Linear(16, 4))

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))[:, :, None, None].softmax(1)


class GraySqueeze(nn.Module):
    """Global pooling, squeeze(-1).squeeze(-1), Linear, unsqueeze(1), log_softmax(-1)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.features(x).squeeze(-1).squeeze(-1)
        return self.fc(x).unsqueeze(1).log_softmax(-1)  # (N, 1, K)


@pytest.mark.parametrize("net", [GrayView, GraySqueeze])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_onnx_exporters_squeeze_unsqueeze_dynamic_flatten(net, dynamo):
    torch.manual_seed(0)
    model = net().eval()
    kw = {"dynamic_shapes": ({0: torch.export.Dim("n")},)} if dynamo else \
        {"input_names": ["x"], "dynamic_axes": {"x": {0: "n"}}}
    original = _export(model, torch.randn(2, 1, 16, 16), dynamo=dynamo, **kw)
    ops = {n.op_type for n in original.graph.node}
    assert "Unsqueeze" in ops and ("Squeeze" in ops if net is GraySqueeze else "Reshape" in ops)
    fcn = convert_onnx(original, (1, 16, 16))
    x = np.random.default_rng(10).standard_normal((2, 1, 22, 26)).astype(np.float32)
    dense = _run(fcn, x)
    assert dense.shape == (2, 4, 4, 6)
    ref = _sliding(original, x, (1, 16, 16), stride=2)  # (2, 4, 1, 1, 4, 6) or (2, 1, 4, 4, 6)
    np.testing.assert_allclose(dense, ref.reshape(dense.shape), rtol=1e-4, atol=2e-5)
    with torch.no_grad():  # and what PyTorch says for one crop
        crop = model(torch.from_numpy(x[1:, :, 4:20, 2:18])).numpy()
    np.testing.assert_allclose(dense[1, :, 2, 1], crop.reshape(4), rtol=1e-4, atol=2e-5)


def test_one_channel_map_moved_by_reshape_before_flatten():
    """Conv to one channel -> Reshape to a constant [-1, H, W, 1] (NCHW -> NHWC as tf2onnx
    writes it) -> Flatten -> Gemm: the Reshape is read as the Transpose it stands for."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("cw", (1, 3, 3, 3)), ("w", (5, 16))]]
    inits.append(numpy_helper.from_array(np.array([-1, 4, 4, 1], np.int64), "to_nhwc"))
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Reshape", ["c", "to_nhwc"], ["t"], name="move"),
             helper.make_node("Flatten", ["t"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "move", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    original = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fcn = convert_onnx(original, (3, 9, 9))
    assert [n.op_type for n in fcn.graph.node] == ["Conv", "Conv"]
    x = np.random.default_rng(12).standard_normal((2, 3, 13, 11)).astype(np.float32)
    assert _rel(_sliding(original, x, (3, 9, 9), stride=2), _run(fcn, x)) <= 1e-5


def test_size_one_axes_around_matmul_become_identity():
    """Flatten -> Unsqueeze to (N, 1, 80) -> MatMul + Add -> Squeeze: a 3D dense layer."""
    rng = np.random.default_rng(13)
    head = [helper.make_node("Unsqueeze", ["f", "axes"], ["u"], name="unsq"),
            helper.make_node("MatMul", ["u", "w"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
            helper.make_node("Squeeze", ["a", "axes"], ["y"], name="sq")]
    original = _head_graph(head, {"axes": [1], "w": rng.standard_normal((80, 4)),
                                  "b": rng.standard_normal((1, 1, 4))})
    fcn = convert_onnx(original, (3, 9, 9))
    assert [n.op_type for n in fcn.graph.node] == ["Conv", "Identity", "Conv", "Identity"]
    x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
    assert _rel(_sliding(original, x, (3, 9, 9), stride=2), _run(fcn, x)) <= 1e-5


class SkipInit(nn.Module):
    """timm's NormFreeBlock with skipinit in miniature: ``out.mul_(gain)``, result unused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gain = nn.Parameter(torch.tensor(1.7))
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        out = torch.max_pool2d(self.conv(x), 2)
        out.mul_(self.gain)
        return self.fc(out.flatten(1))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_in_place_writes_survive_export_and_conversion(dynamo):
    """The exporters write the in-place ops as plain ONNX nodes; convert_onnx keeps them."""
    torch.manual_seed(0)
    model = SkipInit().eval()
    original = _export(model, torch.randn(1, 3, 8, 8), dynamo=dynamo)
    fcn = convert_onnx(original, (3, 8, 8))
    x = np.random.default_rng(14).standard_normal((2, 3, 14, 12)).astype(np.float32)
    dense = _run(fcn, x)
    assert dense.shape == (2, 5, 4, 3)
    assert _rel(_sliding(original, x, (3, 8, 8), stride=2), dense) <= 1e-5
    with torch.no_grad():  # and PyTorch's model on one crop: the exporter kept the writes
        crop = model(torch.from_numpy(x[1:, :, 2:10, 4:12])).numpy()
    np.testing.assert_allclose(dense[1, :, 1, 2], crop[0], rtol=1e-4, atol=1e-5)


def test_initializers_shared_through_identity():
    """The TorchScript exporter writes one initializer for equal weights and passes it to
    the second layer through an Identity (VGG's zero biases): still a constant."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                        nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[3].bias.zero_()
        net[5].bias.zero_()
    original = _export(net, torch.randn(1, 1, 8, 8), dynamo=False)
    assert "Identity" in {n.op_type for n in original.graph.node}
    fcn = convert_onnx(original, (1, 8, 8))
    x = np.random.default_rng(3).standard_normal((1, 1, 13, 11)).astype(np.float32)
    with torch.no_grad():
        ref = nofc.convert(net, (1, 8, 8))(torch.from_numpy(x)).numpy()
    assert _rel(ref, _run(fcn, x)) <= 1e-5
