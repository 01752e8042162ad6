import pytest
import torchvision

import nofc
from nofc import NofcError


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "mobilenet_v3_small"])
def test_parameter_totals_equal(name):
    table = nofc.explain(torchvision.models.get_model(name), input_size=(3, 224, 224))
    assert table.params_before == table.params_after
    assert "(equal)" in str(table)
    assert all(r.params_before == r.params_after for r in table.rows)


def test_alexnet_rows():
    table = nofc.explain(torchvision.models.alexnet(), input_size=(3, 224, 224), at=(287, 287))
    rows = {r.name: r for r in table.rows}
    assert rows["avgpool"].op_after == "removed"  # 6x6 adaptive pool is the identity here
    assert rows["classifier.1"].kernel_after == "4096x256x6x6"
    assert rows["classifier.1"].shape_before == "4096"
    assert rows["classifier.1"].shape_after == "4096x1x1"
    assert table.output_at == (1, 1000, 3, 3)


def test_function_pooling_row_shows_replacement():
    table = nofc.explain(torchvision.models.mobilenet_v2(), input_size=(3, 224, 224))
    row = next(r for r in table.rows if r.op_after.startswith("AvgPool2d"))
    assert row.kernel_after == "7x7" and row.changed


def test_at_smaller_than_window_is_an_error():
    with pytest.raises(NofcError, match="100x100"):
        nofc.explain(torchvision.models.resnet18(), input_size=(3, 224, 224), at=(100, 100))
