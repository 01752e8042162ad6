"""A check before a map is trusted (issue 21): every entry point that converts a model
for the user runs the conversion against the classifier at the reference size first."""

import numpy as np
import PIL.Image
import pytest
import torch

import nofc
import nofc.conversion
from nofc.cli import main
from nofc.zoo import LeNet5

SIZE = (1, 32, 32)


@pytest.fixture
def wrong_conversion(monkeypatch):
    """``convert`` as if it had a bug: the converted network's last bias is off by 0.5."""
    real = nofc.conversion.convert

    def convert(model, input_size, **kwargs):
        fcn = real(model, input_size, **kwargs)
        with torch.no_grad():
            [p for n, p in fcn.named_parameters() if n.endswith("bias")][-1].add_(0.5)
        return fcn

    monkeypatch.setattr(nofc.conversion, "convert", convert)


def test_a_conversion_that_differs_is_refused_before_any_map(wrong_conversion):
    model = LeNet5().eval()
    x = torch.randn(1, 48, 40)
    with pytest.raises(nofc.NofcError, match=r"differs from the classifier at 32x32 \(max "
                                             r"error .* of the largest output"):
        nofc.dense_predict(model, x, SIZE)
    with pytest.raises(nofc.NofcError, match="differs from the classifier"):
        nofc.tiled_predict(model, x[0].numpy(), SIZE, tile=32, progress=False)
    # opted out: the user checked already (here: the map is wrong, as asked)
    assert nofc.dense_predict(model, x, SIZE, check=False).shape == (1, 10, 5, 3)
    assert nofc.tiled_predict(model, x[0].numpy(), SIZE, tile=32, progress=False,
                              check=False).shape == (10, 5, 3)


def test_a_right_conversion_passes_in_train_mode_too_and_leaves_the_model_alone():
    model = LeNet5().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = nofc.dense_predict(model, torch.randn(1, 48, 40), SIZE)
    assert got.shape == (1, 10, 5, 3) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_heatmap_refuses_a_network_that_does_not_verify(wrong_conversion, tmp_path, capsys):
    img = tmp_path / "page.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8)
                        ).save(img)
    out = tmp_path / "h.png"
    code = main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "differs from the classifier" in err and "Traceback" not in err
    assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "-o", str(out),
                 "--no-check"]) == 0
    assert out.exists()
