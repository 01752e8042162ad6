"""Read pages of handwritten digit strings with a converted classifier, in one pass.

A LeNet-style classifier (no padding, 24x24 window, stride 4) learns the 10 digits of
scikit-learn's bundled handwritten digits plus a background class, from crops of
synthetic training pages. nofc converts it into a fully convolutional network that scores
every 24x24 window of a whole page in one pass; the digits are read off the map (peaks of
"not background", grouped into lines and strings) and compared with the truth. Every test
page is built only from a held-out split of the digits.

    python examples/digits_demo.py            # 5 pages of 100 held-out digits
    python examples/digits_demo.py --help

Trained weights are cached in .cache/ (delete it, or pass --retrain, to train again);
the heatmap goes to out/digits_heatmap.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import nofc

WINDOW = 24  # input size of the classifier
DIGIT = 16  # digits are upscaled from 8x8 to 16x16, centred in the window
BACKGROUND = 10  # class index of "no digit centred here"
LINE_PITCH = 30  # pixels between text lines
MARGIN = 8  # blank border around the text
INPUT_SIZE = (1, WINDOW, WINDOW)


def make_net() -> nn.Module:
    """conv5(16) - pool - conv3(32) - pool - Linear(512, 128) - Linear(128, 11); no padding."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # 24 -> 20 -> 10
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),  # 10 -> 8 -> 4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 11),
    )


# --------------------------------------------------------------------------- data


def load_split(seed: int = 0, test_fraction: float = 0.4):
    """sklearn's 1797 digits as 16x16 images in [0, 1], split stratified into train/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images / 16.0).float()[:, None]  # (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear",
                                        align_corners=False)[:, 0].clamp(0, 1).numpy()
    return train_test_split(x, d.target, test_size=test_fraction, stratify=d.target,
                            random_state=seed)


@dataclass
class Page:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    digits: list  # (cy, cx, label, line, string) per digit: centre of its 16x16 box
    lines: list  # per line: list of strings of labels, e.g. ["123", "45"]


def make_page(images, labels, rng, n_digits: int = 100, width: int = 420,
              blank_lines: int = 1) -> Page:
    """Lines of strings of 2 to 6 digits with random gaps; ``blank_lines`` empty lines.

    Within a string digits are 0 to 3 pixels apart; strings are 16 to 44 pixels apart;
    each digit also moves up or down by up to 2 pixels.
    """
    order = rng.permutation(len(images))[:n_digits]
    if len(order) < n_digits:
        raise ValueError(f"only {len(images)} digits to build a page of {n_digits}")
    lines, placed = [], []
    k = 0
    while k < n_digits:
        x, line = MARGIN + int(rng.integers(0, 12)), []
        while k < n_digits:
            n = min(int(rng.integers(2, 7)), n_digits - k)
            need = n * (DIGIT + 3)
            if x + need > width - MARGIN:
                break
            string = []
            for _ in range(n):
                string.append((x, order[k]))
                x += DIGIT + int(rng.integers(0, 4))
                k += 1
            line.append(string)
            x += int(rng.integers(16, 45))
        if not line:  # a long string did not fit on an empty line: start it anyway
            continue
        lines.append(line)
    rows = len(lines) + blank_lines
    height = 2 * MARGIN + rows * LINE_PITCH
    page = np.zeros((height, width), np.float32)
    blank_at = set(rng.choice(rows, size=blank_lines, replace=False).tolist())
    truth_lines = []
    r = 0
    for row in range(rows):
        if row in blank_at:
            continue
        y = MARGIN + row * LINE_PITCH + (LINE_PITCH - DIGIT) // 2
        texts = []
        for s_idx, string in enumerate(lines[r]):
            text = ""
            for x, idx in string:
                dy = int(rng.integers(-2, 3))
                box = page[y + dy: y + dy + DIGIT, x: x + DIGIT]
                np.maximum(box, images[idx], out=box)
                placed.append((y + dy + DIGIT / 2, x + DIGIT / 2, int(labels[idx]), r, s_idx))
                text += str(int(labels[idx]))
            texts.append(text)
        truth_lines.append(texts)
        r += 1
    return Page(page, placed, truth_lines)


def training_crops(images, labels, rng, n_pages: int):
    """Crops of synthetic pages: digits centred within 2 px, and background windows.

    Background is everything else a window can see on a page: blank paper, a digit
    shifted 5 or more pixels off centre, half of one digit and half of the next, the
    lines above and below. Windows 3 or 4 pixels off centre are left out (ambiguous).
    """
    xs, ys = [], []
    half = WINDOW // 2
    for _ in range(n_pages):
        page = make_page(images, labels, rng, n_digits=60, width=300)
        img = np.pad(page.image, half)  # windows may hang over the page edge
        centres = np.array([(cy, cx) for cy, cx, *_ in page.digits])
        lab = np.array([d[2] for d in page.digits])
        # positives: every digit a few times, up to 2 px off centre
        pos = np.repeat(centres, 4, axis=0) + rng.integers(-2, 3, size=(4 * len(centres), 2))
        # hard negatives around digits, and random windows anywhere
        n_near = 6 * len(centres)
        off = rng.integers(5, 13, size=(n_near, 2)) * rng.choice([-1, 1], size=(n_near, 2))
        off[: 3 * len(centres), 0] = rng.integers(-2, 3, size=3 * len(centres))  # sideways
        off[3 * len(centres):, 1] = rng.integers(-4, 5, size=3 * len(centres))  # up/down
        near = np.repeat(centres, 6, axis=0) + off
        anywhere = np.stack([rng.uniform(0, page.image.shape[0], 3 * len(centres)),
                             rng.uniform(0, page.image.shape[1], 3 * len(centres))], 1)
        pts = np.concatenate([pos, near, anywhere]).round().astype(int)
        d = np.abs(pts[:, None, :] - centres[None]).max(-1)  # (P, digits): Chebyshev
        nearest = d.argmin(1)
        dist = d.min(1)
        keep = (dist <= 2) | (dist >= 5)
        pts, nearest, dist = pts[keep], nearest[keep], dist[keep]
        target = np.where(dist <= 2, lab[nearest], BACKGROUND)
        for (cy, cx), t in zip(pts, target):
            y0, x0 = cy, cx  # in padded coordinates the window starts at the centre
            xs.append(img[y0: y0 + WINDOW, x0: x0 + WINDOW])
            ys.append(t)
    return np.stack(xs)[:, None], np.array(ys)


def train(images, labels, *, epochs: int, pages: int, seed: int, log=print) -> nn.Module:
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed)
    x, y = training_crops(images, labels, rng, pages)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs *
                                                ((len(x) + 127) // 128))
    loss_fn = nn.CrossEntropyLoss()
    log(f"training on {len(x)} crops ({int((y != BACKGROUND).sum())} digits, "
        f"{int((y == BACKGROUND).sum())} background) for {epochs} epochs")
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        total, correct = 0.0, 0
        for i in range(0, len(x), 128):
            idx = perm[i: i + 128]
            out = net(x[idx])
            loss = loss_fn(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
        log(f"  epoch {epoch + 1}: loss {total / len(x):.4f}, train accuracy "
            f"{correct / len(x):.4f}")
    return net.eval()


# --------------------------------------------------------------------------- reading


def read_page(scores: torch.Tensor, geo, image_hw, *, step=None, threshold: float = 0.5):
    """Detections ``(cy, cx, label, p)`` from the ``(11, h, w)`` map of an ``image_hw``
    page computed with ``step`` (default: the stride): peaks of P(digit).

    A cell is a candidate when P(background) < 1 - threshold; candidates are taken by
    decreasing probability, each suppressing the others within half a digit around it.
    """
    probs = torch.softmax(scores.double(), dim=0)
    fg = 1.0 - probs[BACKGROUND]
    ys, xs = geo.centers(image_hw, step=step)  # window centre of each map row / column
    cand = torch.nonzero(fg > threshold)
    order = fg[cand[:, 0], cand[:, 1]].argsort(descending=True)
    taken = []
    for i, j in cand[order].tolist():
        cy, cx = float(ys[i]), float(xs[j])
        if any(abs(cy - ty) < 12 and abs(cx - tx) < 10 for ty, tx, *_ in taken):
            continue
        label = int(probs[:BACKGROUND, i, j].argmax())
        taken.append((cy, cx, label, float(fg[i, j])))
    return taken


def group_lines(dets):
    """Detections -> lines (top to bottom) of strings (left to right) of digit labels."""
    lines = []
    for d in sorted(dets, key=lambda d: d[0]):
        if lines and abs(d[0] - np.mean([e[0] for e in lines[-1]])) < LINE_PITCH / 2:
            lines[-1].append(d)
        else:
            lines.append([d])
    out = []
    for line in lines:
        line.sort(key=lambda d: d[1])
        strings, prev = [], None
        for d in line:
            if prev is None or d[1] - prev > DIGIT + 3 + 8:  # a gap wider than in a string
                strings.append("")
            strings[-1] += str(d[2])
            prev = d[1]
        out.append(strings)
    return out


def score_page(page: Page, dets):
    """(digits read correctly, false detections, false detections on blank paper)."""
    truth = [(cy, cx, lab) for cy, cx, lab, *_ in page.digits]
    used = set()
    correct, false, blank = 0, 0, 0
    for cy, cx, label, _ in dets:
        best = None
        for k, (ty, tx, tl) in enumerate(truth):
            if k not in used and abs(cy - ty) <= 6 and abs(cx - tx) <= 6:
                if best is None or abs(cx - tx) < abs(cx - truth[best][1]):
                    best = k
        if best is None:
            false += 1
            y0, x0 = int(cy - DIGIT / 2), int(cx - DIGIT / 2)
            if page.image[max(y0, 0): y0 + DIGIT, max(x0, 0): x0 + DIGIT].max() == 0:
                blank += 1
            continue
        used.add(best)
        correct += int(truth[best][2] == label)
    return correct, false, blank


# --------------------------------------------------------------------------- main


def _threads() -> int:
    """One thread: batches of 128 crops of a net this small are too little work to split
    (two threads were no faster on an idle machine and ten times slower on a busy one,
    where OpenMP threads wait for each other)."""
    return 1


def get_net(train_x, train_y, *, epochs, pages, seed, cache: Path | None, log,
            retrain: bool = False) -> nn.Module:
    key = hashlib.sha256(json.dumps([epochs, pages, seed, WINDOW, DIGIT, 2]).encode())
    path = cache / f"digits_net_{key.hexdigest()[:12]}.pt" if cache else None
    net = make_net()
    if path is not None and path.is_file() and not retrain:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"loaded cached weights {path}")
        return net.eval()
    net = train(train_x, train_y, epochs=epochs, pages=pages, seed=seed, log=log)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
    return net


def run(*, pages: int = 5, digits: int = 100, epochs: int = 8, train_pages: int = 30,
        seed: int = 0, cache: str | None = ".cache", out: str | None = "out",
        retrain: bool = False, log=print) -> dict:
    """Train (or load), convert, read ``pages`` test pages; returns the measurements."""
    t0 = time.perf_counter()
    torch.set_num_threads(_threads())
    train_x, test_x, train_y, test_y = load_split(seed)
    net = get_net(train_x, train_y, epochs=epochs, pages=train_pages, seed=seed,
                  cache=Path(cache) if cache else None, log=log, retrain=retrain)
    t_train = time.perf_counter() - t0

    fcn = nofc.convert(net, INPUT_SIZE)
    geo = nofc.geometry(fcn, INPUT_SIZE)
    log(f"converted: window {geo.window}, stride {geo.stride}, exact {geo.exact}")
    rng = np.random.default_rng(seed + 1000)
    digit_pool = rng.permutation(len(test_x))
    results, t_read = [], 0.0
    for p in range(pages):
        # each page gets its own held-out digits while there are enough
        chunk = digit_pool[(p * digits) % len(test_x):][:digits]
        if len(chunk) < digits:
            chunk = rng.permutation(len(test_x))[:digits]
        page = make_page(test_x[chunk], test_y[chunk], rng, n_digits=digits)
        t1 = time.perf_counter()
        scores = nofc.dense_predict(fcn, page.image[None], INPUT_SIZE)[0]  # (11, h, w)
        dets = read_page(scores, geo, page.image.shape)
        t_read += time.perf_counter() - t1
        correct, false, blank = score_page(page, dets)
        read = group_lines(dets)
        log(f"\npage {p + 1}: {page.image.shape[0]}x{page.image.shape[1]} pixels, map "
            f"{tuple(scores.shape[1:])}")
        for k in range(max(len(read), len(page.lines))):
            got = " ".join(read[k]) if k < len(read) else ""
            want = " ".join(page.lines[k]) if k < len(page.lines) else ""
            log(f"  {'ok ' if got == want else 'ERR'} read {got:<40} truth {want}")
        acc = correct / digits
        log(f"  digits read correctly: {correct}/{digits} = {acc:.1%}; false detections: "
            f"{false} ({blank} on blank paper)")
        results.append({"accuracy": acc, "false": false, "blank": blank, "page": page,
                        "scores": scores, "dets": dets})
    mean = float(np.mean([r["accuracy"] for r in results]))
    worst = float(min(r["accuracy"] for r in results))
    total = time.perf_counter() - t0
    log(f"\nmean accuracy {mean:.2%} over {pages} pages of {digits} held-out digits, worst "
        f"page {worst:.0%}, false detections {sum(r['false'] for r in results)} (on blank "
        f"paper {sum(r['blank'] for r in results)}); training/loading {t_train:.1f} s, "
        f"reading {t_read:.2f} s, total {total:.1f} s on {torch.get_num_threads()} threads")
    if out:
        path = write_heatmap(results[0], geo, Path(out) / "digits_heatmap.png")
        log(f"wrote {path}")
    return {"mean": mean, "worst": worst, "results": results, "seconds": total,
            "train_seconds": t_train, "read_seconds": t_read, "fcn": fcn, "geo": geo}


def write_heatmap(result, geo, path: Path) -> Path:
    from nofc.render import render_heatmap

    path.parent.mkdir(parents=True, exist_ok=True)
    probs = torch.softmax(result["scores"].double(), 0).numpy()
    page = result["page"]
    marks = [(cy - 14, cx, str(label)) for cy, cx, label, _ in result["dets"]]
    render_heatmap(path, page.image[None], (1.0 - probs[BACKGROUND])[None],
                   ["P(digit) = 1 - P(background); read digits in cyan"], geo, geo.stride,
                   marks=marks, panel=9.0, alpha=0.6,
                   title=f"one pass of the converted net over a {page.image.shape[0]}x"
                         f"{page.image.shape[1]} page: {result['accuracy']:.0%} read")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, default=5)
    p.add_argument("--digits", type=int, default=100, help="digits per page")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-pages", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=".cache", help="folder for trained weights")
    p.add_argument("--retrain", action="store_true",
                   help="train even when cached weights exist (and replace them)")
    p.add_argument("--out", default="out", help="folder for the heatmap PNG")
    args = p.parse_args(argv)
    r = run(pages=args.pages, digits=args.digits, epochs=args.epochs,
            train_pages=args.train_pages, seed=args.seed,
            cache=args.cache or None, out=args.out, retrain=args.retrain)
    ok = r["mean"] >= 0.98 and r["worst"] >= 0.95 and not any(x["blank"] for x in r["results"])
    print("targets (mean >= 98%, no page below 95%, nothing on blank paper): "
          + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
