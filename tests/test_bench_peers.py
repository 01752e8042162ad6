"""benchmarks/bench_peers.py without the peers: its help, plan, tables and agreement.

TIAToolbox and MONAI live in .venv-peers only; nothing here imports them.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_peers")


def test_help_needs_no_peers(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--setup" in out and "--timeout" in out and ".venv-peers" in out


def test_default_plan_skips_the_long_runs(bench):
    runs = bench._plan(bench._parser().parse_args([]))
    skipped = {(r["tool"], r["model"], r["size"], r["stride"]) for r in runs if r.get("skip")}
    assert ("tiatoolbox", "resnet18", 8192, 32) in skipped
    assert ("monai", "densenet121", 2048, 32) in skipped
    assert ("monai", "densenet121", 8192, 32) in skipped
    # the patch stride runs on every slide: the 8192² rates are measured
    assert ("monai", "densenet121", 8192, 224) not in skipped
    assert ("tiatoolbox", "resnet18", 8192, 224) not in skipped
    assert not any(r["model"] == "tissue" and r["size"] == 8192 for r in runs)
    # nofc is the reference: it comes first for every model and slide
    first = {}
    for r in runs:
        first.setdefault((r["model"], r["size"]), r["tool"])
    assert set(first.values()) == {"nofc"}


def test_tables(bench):
    rows = [dict(tool="nofc", model="resnet18", size=2048, stride=32, windows=3364,
                 seconds=4.0, rss_mb=1900.0, ratio=1.0, note=""),
            dict(tool="tiatoolbox", model="resnet18", size=8192, stride=32, mask=False,
                 skip=True, note="skipped")]
    text = bench.table(rows)
    assert "| nofc | resnet18 | 2048² | 32 | 3364 | 4.00 | 841.0 | 1900 MB | 1.0x |" in text
    assert "| tiatoolbox | resnet18 | 8192² | 32 | - | - | - | - | - | skipped |" in text
    agree = bench.agreement_table([dict(tool="tiatoolbox", mask=True, model="tissue",
                                        size=2048, stride=32, interior=[10, 1.0, 2e-7],
                                        border=[0, 0.0, 0.0])])
    assert "| tiatoolbox mask | tissue | 2048² | 32 | 10 | 100.00% | 2e-07 | 0 | - | - |" in agree


def test_agreement_matches_windows_by_corner(bench, tmp_path):
    rng = np.random.default_rng(0)
    m = rng.random((2, 5, 5)).astype(np.float32)        # nofc: step 8, window 16, side 48
    np.savez(tmp_path / "ref.npz", map=m, step=8)
    # a peer at stride 16, with one window padded past the border (dropped)
    ys, xs = np.meshgrid(np.arange(0, 48, 16), np.arange(0, 48, 16), indexing="ij")
    y0, x0 = np.append(ys.ravel(), 40), np.append(xs.ravel(), 0)   # (40, 0) is padded
    probs = np.stack([m[:, min(y // 8, 4), min(x // 8, 4)] for y, x in zip(y0, x0)])
    probs[0] = probs[0][::-1]                           # one disagreeing border window
    np.savez(tmp_path / "peer.npz", y0=y0, x0=x0, probs=probs)
    a = bench._agreement(tmp_path / "ref.npz", tmp_path / "peer.npz", 16, 48)
    assert a["interior"] == [1, 1.0, 0.0]               # (16, 16): cell (2, 2)
    n, same, diff = a["border"]
    assert n == 8 and same == pytest.approx(7 / 8) and diff > 0
