"""File size of merged regions next to one QuPath detection per cell, on one slide.

A synthetic 4096 x 4096 slide (glass, a tumour disc with a hole of glass, a stroma blob,
pixel noise) and a colour classifier on 16 x 16 windows (mean colour, nearest of three
prototypes), converted and run at stride 16 (a 256 x 256 map), written once per output:

    python benchmarks/bench_regions.py [--size 4096]

Prints each file's size, features and the time of the run that wrote it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nofc
from nofc.sinks import GeoJsonOutput, RegionsOutput

CLASSES = ["tumour", "stroma", "glass"]
COLOURS = np.array([[0.45, 0.25, 0.55], [0.90, 0.55, 0.70], [0.95, 0.95, 0.95]])


def slide(n: int, seed: int = 0) -> np.ndarray:
    """(n, n, 3) uint8: glass, a tumour disc with a glass hole, a wavy stroma blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] / n
    r1 = np.hypot(y - 0.33, x - 0.33)
    angle = np.arctan2(y - 0.68, x - 0.70)
    r2 = np.hypot(y - 0.68, x - 0.70) / (1 + 0.15 * np.sin(5 * angle))
    label = np.full((n, n), 2)
    label[(r1 < 0.25) & (r1 > 0.08)] = 0
    label[r2 < 0.22] = 1
    img = COLOURS[label] + rng.normal(0, 0.08, (n, n, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def classifier() -> torch.nn.Module:
    """Mean colour of a 16 x 16 window -> logits -20 |colour - prototype|² (+ |colour|²)."""
    net = torch.nn.Sequential(torch.nn.AvgPool2d(16), torch.nn.Flatten(),
                              torch.nn.Linear(3, 3))
    c = torch.tensor(COLOURS, dtype=torch.float32)
    with torch.no_grad():
        net[2].weight.copy_(40 * c)
        net[2].bias.copy_(-20 * (c ** 2).sum(1))
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    img = slide(args.size)
    fcn = nofc.convert(classifier(), (3, 16, 16))
    meta = {"classes": CLASSES}
    with tempfile.TemporaryDirectory() as d:
        outputs = [("cells.geojson (per cell)", GeoJsonOutput(f"{d}/cells.geojson",
                                                               metadata=meta)),
                   ("tissue.regions.geojson", RegionsOutput(f"{d}/all.regions.geojson",
                                                            metadata=meta)),
                   ("... glass left out", RegionsOutput(f"{d}/tissue.regions.geojson",
                                                        exclude="glass", metadata=meta)),
                   ("tissue.gpkg, glass left out", RegionsOutput(f"{d}/tissue.gpkg",
                                                                 exclude="glass", metadata=meta)),
                   ("tissue.fgb, glass left out", RegionsOutput(f"{d}/tissue.fgb",
                                                                exclude="glass", metadata=meta))]
        print(f"slide {args.size}x{args.size}, stride 16, 16x16 windows")
        for what, out in outputs:
            t0 = time.perf_counter()
            scores = nofc.tiled_predict(fcn, img, (3, 16, 16), out=out, progress=False)
            took = time.perf_counter() - t0
            size = Path(out.path).stat().st_size
            feats = len(json.loads(Path(out.path).read_text())["features"]) \
                if out.path.endswith(".geojson") else "-"
            print(f"  {what:30s} {size / 1e6:8.3f} MB  {str(feats):>6s} features  "
                  f"{took:5.1f} s  (map {scores.shape[1]}x{scores.shape[2]})")


if __name__ == "__main__":
    main()
