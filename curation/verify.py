"""Geometric verification of candidate copy pairs: the precision stage of near-duplicate removal.

An embedding threshold alone cannot tell a copy from an image that merely shares content with
another (two collages with one tile in common, two tightly aligned faces). Verification checks
each candidate edge above ``dedup.threshold`` the way copy-detection matching systems do:

1. SIFT keypoints of both images (grey, longer side resized to ``max_side``), Lowe ratio test;
2. a RANSAC similarity transform (rotation, scale, shift) with at least ``min_inliers`` inliers;
3. the aligned frames must overlap on at least ``min_overlap`` of the image more inside the
   other, and the band-passed grey images must agree over that overlap: the median of the
   correlations of a ``grid`` x ``grid`` cell grid is at least ``min_correlation``. A copy
   agrees everywhere the two frames meet but under an overlay, a shared tile only inside the
   tile.

A pair that fails is tried once more with one image mirrored (a flip is a common copy edit).
Edges are verified in blocks, each saved atomically, so a killed run resumes where it stopped.
Needs OpenCV (``pip install 'dinosys[verify]'``); off by default (``dedup.verify.enabled``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from curation.config import VerifyConfig
from curation.store import load_npy, save_npy
from dinosys.data.decode import decode_image
from dinosys.errors import UserError

log = logging.getLogger(__name__)

# Per edge: not checked (below the threshold), rejected, confirmed, confirmed with one image
# mirrored, accepted unchecked (at or above ``accept_above``), or one of the two images could
# not be decoded (not confirmed).
UNCHECKED, REJECTED, CONFIRMED, CONFIRMED_FLIP, ACCEPTED, UNDECODABLE = -1, 0, 1, 2, 4, -3


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise UserError("dedup.verify needs OpenCV: pip install 'dinosys[verify]' "
                        "(opencv-python-headless), or set dedup.verify.enabled=false") from exc
    return cv2


@dataclass
class Features:
    """One image prepared for matching: grey pixels and SIFT keypoints, upright and mirrored."""

    grey: np.ndarray
    points: np.ndarray  # (K, 2) float32 keypoint positions
    desc: np.ndarray | None  # (K, 128) float32 SIFT descriptors
    points_flip: np.ndarray
    desc_flip: np.ndarray | None


def grey_image(data: bytes, max_side: int, max_pixels: int) -> np.ndarray:
    """Decode image bytes (as embedding did: displayed orientation, pixel limit) to uint8 grey
    with the longer side resized to ``max_side``; small images are enlarged too, so a thumbnail
    and its original are matched at one scale."""
    grey = decode_image(data, max_pixels, draft_size=(max_side, max_side)).convert("L")
    w, h = grey.size
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if size != grey.size:
        grey = grey.resize(size, Image.BICUBIC if s > 1 else Image.BILINEAR)
    return np.asarray(grey, dtype=np.uint8)


def extract_features(grey: np.ndarray, n_features: int = VerifyConfig.n_features,
                     contrast_threshold: float = VerifyConfig.contrast_threshold) -> Features:
    """SIFT keypoints of ``grey`` and of its mirror image."""
    cv2 = _cv2()
    sift = cv2.SIFT_create(nfeatures=n_features, contrastThreshold=contrast_threshold)
    out = []
    for g in (grey, np.ascontiguousarray(grey[:, ::-1])):
        kp, desc = sift.detectAndCompute(g, None)
        out.append((np.float32([p.pt for p in kp]).reshape(-1, 2), desc))
    return Features(grey, out[0][0], out[0][1], out[1][0], out[1][1])


@dataclass
class Match:
    """The outcome of verifying one pair."""

    status: int
    inliers: int = 0
    overlap: float = 0.0
    correlation: float = 0.0


def _align(pa: np.ndarray, da: np.ndarray | None, pb: np.ndarray, db: np.ndarray | None,
           cfg: VerifyConfig) -> tuple[np.ndarray | None, int]:
    """Similarity transform taking image a to image b, and its RANSAC inlier count."""
    cv2 = _cv2()
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return None, 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(da, db, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < cfg.ratio * m[1].distance]
    if len(good) < max(3, cfg.min_inliers):
        return None, len(good)
    src = pa[[g.queryIdx for g in good]]
    dst = pb[[g.trainIdx for g in good]]
    M, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                         ransacReprojThreshold=cfg.ransac_px, maxIters=2000,
                                         confidence=0.995, refineIters=10)
    if M is None:
        return None, 0
    return M, int(inl.sum())


def _cell_correlations(x: np.ndarray, y: np.ndarray, mask: np.ndarray, cells: int,
                       min_std: float) -> np.ndarray:
    """NCC of ``x`` and ``y`` in each cell of a ``cells`` x ``cells`` grid over the bounding box
    of ``mask``, for the cells mostly inside the mask where either image has texture."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out = []
    for r in range(cells):
        for c in range(cells):
            sl = (slice(y0 + (y1 - y0) * r // cells, y0 + (y1 - y0) * (r + 1) // cells),
                  slice(x0 + (x1 - x0) * c // cells, x0 + (x1 - x0) * (c + 1) // cells))
            m = mask[sl]
            if m.size == 0 or m.mean() < 0.5:
                continue
            a, b = x[sl][m], y[sl][m]
            a, b = a - a.mean(), b - b.mean()
            sa, sb = np.sqrt((a * a).mean()), np.sqrt((b * b).mean())
            if max(sa, sb) < min_std:
                continue  # flat in both images: no evidence either way
            out.append(float((a * b).mean() / (sa * sb)) if sa > 0 and sb > 0 else 0.0)
    return np.array(out)


def _band_pass(grey: np.ndarray) -> np.ndarray:
    """Difference of Gaussians (sigma 1 and 4): structure at the scale of edges and texture,
    without JPEG noise and without smooth gradients (any two gradients correlate, aligned or
    not)."""
    cv2 = _cv2()
    g = grey.astype(np.float32)
    return cv2.GaussianBlur(g, (0, 0), 1.0) - cv2.GaussianBlur(g, (0, 0), 4.0)


def _aligned_agreement(ga: np.ndarray, gb: np.ndarray, M: np.ndarray,
                       cfg: VerifyConfig) -> tuple[float, float]:
    """(overlap of the two frames once aligned, as a share of the image more inside the other;
    agreement of the band-passed grey images over that overlap: the median of per-cell
    correlations, so a local overlay (text, a logo) costs only its cells, while content shared
    by a single tile of a collage wins only its cells)."""
    cv2 = _cv2()
    h, w = gb.shape
    warped = cv2.warpAffine(ga, M, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    mask = cv2.warpAffine(np.full(ga.shape, 255, np.uint8), M, (w, h), flags=cv2.INTER_NEAREST,
                          borderValue=0)
    # erode: resampling smears the black border into the frame's edge
    mask = cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0
    area = int(mask.sum())
    # most of one image inside the other: a's frame covers |det M| * a.size pixels of b
    scale2 = abs(float(np.linalg.det(M[:, :2])))
    overlap = min(1.0, max(area / max(scale2 * ga.size, 1.0), area / gb.size))
    if area < 64:
        return overlap, 0.0
    x, y = _band_pass(warped), _band_pass(gb)
    corr = _cell_correlations(x, y, mask, cfg.grid, cfg.min_cell_std)
    return overlap, float(np.median(corr)) if len(corr) else 0.0


def verify_pair(a: Features, b: Features, cfg: VerifyConfig) -> Match:
    """Is ``b`` a copy of ``a`` (or ``a`` of ``b``)? Upright first, then with ``a`` mirrored."""
    best = Match(REJECTED)
    tries = [(a.points, a.desc, a.grey, CONFIRMED)]
    if cfg.flip:
        tries.append((a.points_flip, a.desc_flip, np.ascontiguousarray(a.grey[:, ::-1]),
                      CONFIRMED_FLIP))
    for pts, desc, grey, status in tries:
        M, inliers = _align(pts, desc, b.points, b.desc, cfg)
        if M is None or inliers < cfg.min_inliers:
            best.inliers = max(best.inliers, inliers)
            continue
        overlap, corr = _aligned_agreement(grey, b.grey, M, cfg)
        if overlap >= cfg.min_overlap and corr >= cfg.min_correlation:
            return Match(status, inliers, overlap, corr)
        if best.overlap == 0.0 or corr > best.correlation:  # report the better aligned try
            best = Match(REJECTED, inliers, overlap, corr)
    return best


class FeatureCache:
    """Features by row, computed on demand and kept for the ``capacity`` most recent rows."""

    def __init__(self, load: Callable[[int], bytes], cfg: VerifyConfig,
                 max_pixels: int, capacity: int = 20_000) -> None:
        self.load, self.cfg, self.max_pixels, self.capacity = load, cfg, max_pixels, capacity
        self._store: OrderedDict[int, Features | None] = OrderedDict()

    def compute(self, row: int) -> Features | None:
        """Features of ``row`` (None if the image cannot be decoded)."""
        try:
            grey = grey_image(self.load(row), self.cfg.max_side, self.max_pixels)
            return extract_features(grey, self.cfg.n_features, self.cfg.contrast_threshold)
        except Exception as exc:  # a file that vanished or broke since embedding: never fatal
            log.warning("verify: cannot read image row %d: %s", row, exc)
            return None

    def fill(self, rows: np.ndarray, pool: ThreadPoolExecutor) -> None:
        """Compute the features of every row not cached yet (in parallel)."""
        wanted = [int(r) for r in np.unique(rows)]
        todo = [r for r in wanted if r not in self._store]
        for r, f in zip(todo, pool.map(self.compute, todo)):
            self._store[r] = f
        for r in wanted:
            self._store.move_to_end(r)
        while len(self._store) > max(self.capacity, len(wanted)):
            self._store.popitem(last=False)

    def __getitem__(self, row: int) -> Features | None:
        return self._store[row]


@dataclass
class Verified:
    """Per candidate edge: status code, RANSAC inliers, aligned overlap and correlation."""

    status: np.ndarray
    inliers: np.ndarray
    overlap: np.ndarray
    correlation: np.ndarray

    @property
    def confirmed(self) -> np.ndarray:
        """Edges verified as copies (upright or mirrored)."""
        return is_confirmed(self.status)


def is_confirmed(status: np.ndarray) -> np.ndarray:
    """Which status codes mean verified as a copy (upright or mirrored)."""
    return (status == CONFIRMED) | (status == CONFIRMED_FLIP)


def n_blocks(n_edges: int, cfg: VerifyConfig) -> int:
    """How many blocks of ``cfg.block_size`` candidate edges there are."""
    return (n_edges + cfg.block_size - 1) // cfg.block_size


def verify_edges(i: np.ndarray, j: np.ndarray, load: Callable[[int], bytes], cfg: VerifyConfig,
                 out: Path, max_pixels: int = 89_478_485, progress: bool = True,
                 part: tuple[int, int] = (0, 1)) -> Verified:
    """Verify the edges ``(i[e], j[e])`` (row indices; ``load(row)`` gives the image bytes).

    Blocks of ``cfg.block_size`` edges, in the given order, are saved to ``out`` as
    ``block-XXXXXX.npy`` when done; a re-run with the same ``out`` skips finished blocks.
    ``part=(p, n)`` verifies only the blocks ``b % n == p`` (the others stay zero in the result).
    """
    out.mkdir(parents=True, exist_ok=True)
    n = len(i)
    cache = FeatureCache(load, cfg, max_pixels, cfg.cache_images)
    result = np.zeros((n, 4), dtype=np.float32)
    cv2 = _cv2()
    cv2.setNumThreads(1)  # parallel over images and pairs instead
    total = sum(min(n, (b + 1) * cfg.block_size) - b * cfg.block_size
                for b in range(part[0], n_blocks(n, cfg), part[1]))
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool, \
            tqdm(total=total, desc="verify", unit="pair", disable=not progress) as bar:
        for b in range(part[0], n_blocks(n, cfg), part[1]):
            lo, hi = b * cfg.block_size, min(n, (b + 1) * cfg.block_size)
            path = out / f"block-{b:06d}.npy"
            if path.is_file():
                result[lo:hi] = load_npy(path)
                bar.update(hi - lo)
                continue
            cache.fill(np.concatenate([i[lo:hi], j[lo:hi]]), pool)

            def one(e: int) -> list[float]:
                fa, fb = cache[int(i[e])], cache[int(j[e])]
                if fa is None or fb is None:
                    return [UNDECODABLE, 0, 0, 0]
                try:
                    m = verify_pair(fa, fb, cfg)
                except cv2.error as exc:  # a degenerate geometry must not stop a long stage
                    log.warning("verify: rows %d and %d: %s", i[e], j[e], exc)
                    return [REJECTED, 0, 0, 0]
                return [m.status, m.inliers, m.overlap, m.correlation]

            block = np.array(list(pool.map(one, range(lo, hi))), dtype=np.float32).reshape(-1, 4)
            save_npy(path, block)
            result[lo:hi] = block
            bar.update(hi - lo)
    return Verified(result[:, 0].astype(np.int8), result[:, 1].astype(np.int32),
                    result[:, 2], result[:, 3])
