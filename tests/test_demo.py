"""The digits demo, reduced (fewer training pages and epochs, 2 test pages) but real."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nofc

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("digits_demo", ROOT / "examples" /
                                                  "digits_demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["digits_demo"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The reduced demo, trained once for the tests below."""
    demo = _demo()
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        r = demo.run(pages=2, digits=100, epochs=6, train_pages=20, seed=0, cache=None,
                     out=str(out), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return demo, r, out


def test_digits_demo_reads_held_out_pages(demo_run):
    demo, r, tmp_path = demo_run
    accuracies = [p["accuracy"] for p in r["results"]]
    assert max(accuracies) >= 0.98, accuracies  # the full demo's target, on one page
    assert min(accuracies) >= 0.95, accuracies
    assert all(p["blank"] == 0 for p in r["results"])  # nothing read on blank paper
    assert (tmp_path / "digits_heatmap.png").stat().st_size > 10_000


@pytest.mark.filterwarnings("ignore:nofc. precision 'auto'")
@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_low_precision_reads_the_same_digits(demo_run, precision):
    """The trained net in bfloat16 (or what "auto" picks here) against its float32 maps:
    nearly every cell has the same top class, the probabilities are close and the pages
    read the same digits; the scores stay float32."""
    demo, r, _ = demo_run
    for page in r["results"]:
        image = torch.from_numpy(page["page"].image[None])
        low = nofc.dense_predict(r["fcn"], image, demo.INPUT_SIZE, precision=precision)[0]
        assert low.dtype == torch.float32 and low.shape == page["scores"].shape
        agree = nofc.precision.agreement(page["scores"][None], low[None])
        assert agree["same_top"] >= 0.99, agree
        assert agree["max_prob_diff"] <= 0.1, agree
        dets = demo.read_page(low, r["geo"], page["page"].image.shape)
        assert demo.group_lines(dets) == demo.group_lines(page["dets"])


def test_page_layout_and_reading():
    demo = _demo()
    _, test_x, _, test_y = demo.load_split(0)
    rng = np.random.default_rng(3)
    page = demo.make_page(test_x[:40], test_y[:40], rng, n_digits=40)
    assert len(page.digits) == 40
    assert sum(len(s) for line in page.lines for s in line) == 40
    assert all(2 <= len(s) for line in page.lines for s in line[:-1])
    # reading the truth itself back: perfect detections give the truth's lines
    dets = [(cy, cx, lab, 1.0) for cy, cx, lab, *_ in page.digits]
    assert demo.group_lines(dets) == page.lines
    assert demo.score_page(page, dets) == (40, 0, 0)


def test_converted_digits_net_is_exact_on_a_page():
    demo = _demo()
    net = demo.make_net().double().eval()
    fcn = nofc.convert(net, demo.INPUT_SIZE)
    geo = nofc.geometry(fcn, demo.INPUT_SIZE)
    assert geo.stride == (4, 4) and geo.window == (24, 24) and geo.exact
    page = torch.rand(1, 1, 60, 97, dtype=torch.float64)
    dense = nofc.dense_predict(fcn, page, demo.INPUT_SIZE, step=2)
    naive = nofc.sliding_window_predict(net, page, demo.INPUT_SIZE, step=2)
    assert (dense - naive).abs().max().item() <= 1e-10
