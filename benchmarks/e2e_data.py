"""The data and the figures of gpu_suite.py's `e2e` group (the real `danet train` loop on a GPU).

`make_ade_like` writes an ADE20K-layout folder of JPEG images and 8-bit PNG labels (ADE's label convention) fast
enough to make on the GPU machine itself, which has no datasets and no internet; `loop_figures` turns the run's
JSONL log into images/s and data-wait figures.
"""

from __future__ import annotations

import os
from pathlib import Path

E2E_DATA = Path(os.environ.get("E2E_DATA", "/tmp/danet-e2e-data"))  # NOTE: not under $OUT, which comes back


def ade_scene(rng, h: int, w: int, texture) -> tuple:
    """An ADE20K-like pair: RGB uint8 `(h, w, 3)` of smooth colour blobs + texture, raw label uint8 `(h, w)` with
    ADE's convention (0 "other", ignored by reduce_zero_label; 1..150 the classes)."""
    import cv2
    import numpy as np

    k = int(rng.integers(6, 16))
    hs, ws = max(h // 8, 2), max(w // 8, 2)
    yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32)
    pts = rng.uniform(0, 1, (k, 2)).astype(np.float32) * np.float32([hs, ws])
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    region = (d - rng.uniform(0, hs * ws / k, k).astype(np.float32)).argmin(-1)  # weighted Voronoi cells
    classes = rng.integers(1, 151, k).astype(np.uint8)
    classes[rng.random(k) < 0.15] = 0
    label = cv2.resize(classes[region], (w, h), interpolation=cv2.INTER_NEAREST)
    colours = rng.uniform(30, 225, (k, 3)).astype(np.float32)
    img = cv2.resize(colours[region], (w, h), interpolation=cv2.INTER_LINEAR)
    y0, x0 = rng.integers(0, texture.shape[0] - h + 1), rng.integers(0, texture.shape[1] - w + 1)
    img = cv2.add(img, texture[y0 : y0 + h, x0 : x0 + w])  # ~65 KB JPEGs at 512x683 (real ADE: ~50-150 KB)
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_ade_like(n_train: int, n_val: int, hw: tuple[int, int]) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation} of JPEGs and 8-bit PNG labels under $E2E_DATA
    (h x w, one image in four turned portrait); kept, and reused by a later call with the same sizes."""
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    root = E2E_DATA / f"ade-{n_train}-{n_val}-{hw[0]}x{hw[1]}-v1"
    if (root / "done").is_file():
        return root
    E2E_DATA.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ade-", dir=E2E_DATA))
    noise = np.random.default_rng(0).normal(0, 14, (max(hw) + 64, max(hw) + 64, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 0.8)
    jobs = [("training", "train", i) for i in range(n_train)] + [("validation", "val", i) for i in range(n_val)]
    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            (tmp / "ADEChallengeData2016" / kind / split).mkdir(parents=True)

    def write(job) -> None:
        split, short, i = job
        h, w = hw if i % 4 else hw[::-1]
        img, label = ade_scene(np.random.default_rng([int(split == "validation"), i]), h, w, texture)
        base, name = tmp / "ADEChallengeData2016", f"ADE_{short}_{i + 1:08d}"
        cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tofile(
            base / "images" / split / f"{name}.jpg"
        )
        cv2.imencode(".png", label)[1].tofile(base / "annotations" / split / f"{name}.png")

    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # OpenCV and numpy release the GIL
            list(pool.map(write, jobs))
        (tmp / "done").write_text("")
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def loop_figures(log: list[dict], waits: list[float], warm: int, batch: int) -> dict:
    """Images/s of the train records after iteration `warm` (wall time between the log records, so everything the
    loop does counts: data wait, host-to-device copy, step, loss .item(), logging) and the data wait per iteration."""
    recs = [r for r in log if r.get("type") == "train"]
    t0 = next((r for r in recs if r["iter"] == warm), None)
    last = recs[-1] if recs else None
    if t0 is None or last is None or last["iter"] <= warm:
        raise RuntimeError(f"no train log records after iteration {warm}: {[r.get('iter') for r in recs]}")
    n, dt = last["iter"] - warm, last["time"] - t0["time"]
    after = waits[warm : last["iter"]]  # waits[i]: the wait for the batch of iteration i + 1
    start = next((r["time"] for r in log if r.get("type") == "start"), None)
    return {
        "img_s": round(n * batch / dt, 2),
        "ms_per_iter": round(1e3 * dt / n, 2),
        "data_wait_ms": round(1e3 * sum(after) / max(len(after), 1), 2),
        "data_wait_max_ms": round(1e3 * max(after, default=0.0), 1),
        "img_s_windows": [r["img_s"] for r in recs if r["iter"] > warm],
        "warmup_s": round(t0["time"] - start, 2) if start is not None else None,
        "measured_iters": n,
    }
