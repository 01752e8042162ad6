"""nofc.sinks: the one place that reads an output's suffix, and options that travel with
their output."""

import numpy as np
import PIL.Image
import pytest

import nofc
from nofc.cli import main
from nofc.sinks import (GeoJsonOutput, GeoTiffOutput, MemoryOutput, ZarrOutput, open_sink,
                        output_for)


def test_outputs_by_suffix_and_objects():
    assert output_for(None) == MemoryOutput()
    assert output_for("m.zarr") == ZarrOutput("m.zarr")
    assert output_for("M.TIFF") == GeoTiffOutput("M.TIFF")
    assert output_for("c.geojson", threshold=0.25) == GeoJsonOutput("c.geojson", 0.25)
    given = GeoJsonOutput("c.geojson", threshold=0.9)
    assert output_for(given) is given
    for bad, message in [("x.shp", r"unknown output suffix '\.shp'"),
                         ("x.png", r"unknown output suffix '\.png'"),
                         ("store", "the output needs a suffix")]:
        with pytest.raises(nofc.NofcError, match=message):
            output_for(bad)
    with pytest.raises(nofc.NofcError, match="threshold does not apply to a map kept in memory"):
        output_for(None, threshold=0.5)
    with pytest.raises(nofc.NofcError, match="give threshold to the output object itself"):
        output_for(given, threshold=0.5)
    with pytest.raises(nofc.NofcError, match=r"threshold must be a probability in \[0, 1\]"):
        GeoJsonOutput("c.geojson", threshold=2)
    assert open_sink(None, (2, 3, 4), np.float32).finalize().shape == (2, 3, 4)


@pytest.mark.parametrize("args,message", [
    (["--out", "{tmp}/x.shp"], "unknown output suffix '.shp'"),
    (["--out", "{tmp}/x.png"], "unknown output suffix '.png'"),
    (["--threshold", "0.3"], "threshold does not apply to a map kept in memory"),
    (["--out", "{tmp}/m.zarr", "--threshold", "0.3"], "threshold does not apply to .zarr"),
])
def test_cli_refuses_unknown_outputs_in_one_line(tmp_path, capsys, args, message):
    img = tmp_path / "page.png"
    PIL.Image.fromarray(np.zeros((40, 40), np.uint8)).save(img)
    argv = ["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32",
            "-o", str(tmp_path / "h.png"), *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.png"]  # nothing written
