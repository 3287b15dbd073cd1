"""What a policy may see: features of the image, of the backend's probability map and
of a mask, computed from inference-time information only.

Nothing here takes a ground-truth mask. The environments pass the labels to their
reward and never to these functions, and a test changes only the labels of a dataset
and asserts that every observation stays the same.

Every feature is scaled to roughly [0, 1] by construction (fractions, intensities
over 255, logarithms of counts over the logarithm of a generous maximum), so PPO
needs no running normalisation whose statistics would have to travel with the model.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

#: Coarse grid of the image thumbnail and of the local contrast map.
GRID = 4
#: Buckets of the hashed words of the sample's target ("vessels", "blood vessels").
TARGET_BUCKETS = 8
#: Probability levels at which the share of pixels above is reported.
PROB_LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8)

_LOG_MAX_COUNT = float(np.log1p(256.0))
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def grey(image: np.ndarray) -> np.ndarray:
    """Luminance in [0, 1], float32: what every intensity feature is measured on."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) * (1.0 / 255.0)


def _log_count(n: float) -> float:
    return min(float(np.log1p(max(n, 0.0))) / _LOG_MAX_COUNT, 1.5)


# --- the image -------------------------------------------------------------------------

IMAGE_FEATURES = 20 + 2 * GRID * GRID


def image_features(image: np.ndarray) -> np.ndarray:
    """Global statistics that tell imaging conditions apart: brightness and contrast,
    noise and speckle, sharpness, uneven illumination, plus a coarse thumbnail of
    brightness and of local contrast (where the image is dark, glaring or busy)."""
    g = grey(image)
    rgb = image.reshape(-1, 3).astype(np.float32) * (1.0 / 255.0)
    p5, p50, p95 = np.percentile(g, (5, 50, 95))
    # Noise and speckle: what a 3x3 median removes.
    residual = np.abs(g - cv2.medianBlur((g * 255).astype(np.uint8), 3).astype(np.float32) / 255.0)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    gradient = np.sqrt(gx * gx + gy * gy)
    # Sharpness: fine detail (Laplacian) relative to edges; blur lowers it.
    laplacian = np.abs(cv2.Laplacian(g, cv2.CV_32F, ksize=1))
    cells = cv2.resize(g, (GRID, GRID), interpolation=cv2.INTER_AREA)
    local_sd = np.sqrt(np.maximum(
        cv2.resize(g * g, (GRID, GRID), interpolation=cv2.INTER_AREA) - cells * cells, 0.0))
    out = np.concatenate([
        [g.mean(), g.std() * 4, p5, p50, p95, (p95 - p5)],
        rgb.mean(axis=0), rgb.std(axis=0) * 4,
        [residual.mean() * 20, float(np.mean(residual > 0.08)) * 10],
        [gradient.mean() * 2, np.percentile(gradient, 95)],
        [laplacian.mean() * 10, laplacian.mean() / (gradient.mean() + 1e-3)],
        [cells.max() - cells.min(), cells.min()],
        cells.ravel(), local_sd.ravel() * 8,
    ]).astype(np.float32)
    assert out.size == IMAGE_FEATURES
    return out


def target_features(target: str) -> np.ndarray:
    """The words of what is to be segmented, hashed into a few buckets: the query is
    known at inference time, and which prompt helps may depend on it."""
    out = np.zeros(TARGET_BUCKETS, np.float32)
    for word in target.lower().split():
        bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=2).digest(), "little") % TARGET_BUCKETS
        out[bucket] = 1.0
    return out


PROB_FEATURES = len(PROB_LEVELS) + 2


def prob_features(prob: np.ndarray | None) -> np.ndarray:
    """How the backend's probability map spreads: the share of pixels above a few
    levels (what a threshold move would give) and the share that is uncertain.
    Zeros, with the last entry 0, for backends without probabilities."""
    out = np.zeros(PROB_FEATURES, np.float32)
    if prob is None:
        return out
    size = prob.size
    for i, level in enumerate(PROB_LEVELS):
        out[i] = np.sqrt(np.count_nonzero(prob > level) / size)
    out[-2] = np.count_nonzero((prob > 0.25) & (prob < 0.75)) / size * 10
    out[-1] = 1.0
    return out


# --- a mask ----------------------------------------------------------------------------

MASK_FEATURES = 17


class MaskDescriber:
    """Statistics of masks on one image, built once per image so that the image's
    sums are not recomputed per mask. `describe` returns, in this order:

    0 sqrt of the area fraction        1 empty flag
    2 components (log)                 3 largest component's share of the area
    4 share in components < min area   5 holes (log)
    6 hole area share                  7 boundary share (thin masks are all boundary)
    8 border contact                   9, 10 mean intensity inside, outside
    11 their contrast                  12 intensity spread inside
    13, 14 backend probability inside, outside (0 without probabilities)
    15 IoU with the reference mask     16 area against the reference's (log ratio)

    The reference is the mask an episode starts from (the default prompt's).
    """

    def __init__(self, grey_image: np.ndarray, prob: np.ndarray | None, reference: np.ndarray | None,
                 min_component_area: int = 12) -> None:
        self.grey = grey_image
        self.prob = prob
        self.reference = reference
        self.min_area = min_component_area
        self.pixels = float(grey_image.size)
        self.grey_sum = float(grey_image.sum())
        self.prob_sum = float(prob.sum()) if prob is not None else 0.0
        self.reference_area = float(np.count_nonzero(reference)) if reference is not None else 0.0
        h, w = grey_image.shape
        self.border_pixels = float(2 * (h + w) - 4)

    def describe(self, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(MASK_FEATURES, np.float32)
        m8 = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
        area = float(np.count_nonzero(m8))
        fraction = area / self.pixels
        out[0] = np.sqrt(fraction)
        out[15] = self._iou(mask, area)
        out[16] = np.clip(np.log((area + 1) / (self.reference_area + 1)) / 4 + 0.5, 0, 1)
        if area == 0:
            out[1] = 1.0
            return out
        n, areas = _component_areas(m8, 8)
        out[2] = _log_count(n)
        out[3] = areas.max() / area
        out[4] = areas[areas < self.min_area].sum() / area
        holes, hole_area = self._holes(m8)
        out[5] = _log_count(holes)
        out[6] = hole_area / (area + hole_area)
        out[7] = (area - np.count_nonzero(cv2.erode(m8, _CROSS))) / area  # thin masks are all boundary
        out[8] = (np.count_nonzero(m8[0]) + np.count_nonzero(m8[-1]) + np.count_nonzero(m8[1:-1, 0])
                  + np.count_nonzero(m8[1:-1, -1])) / self.border_pixels
        inside, inside_sd = cv2.meanStdDev(self.grey, mask=m8)
        inside, inside_sd = float(inside[0, 0]), float(inside_sd[0, 0])
        rest = self.pixels - area
        outside = (self.grey_sum - inside * area) / rest if rest else inside
        out[9], out[10], out[11] = inside, outside, (inside - outside) * 2 + 0.5
        out[12] = inside_sd * 4
        if self.prob is not None:
            prob_inside = cv2.mean(self.prob, mask=m8)[0]
            out[13] = prob_inside
            out[14] = (self.prob_sum - prob_inside * area) / rest * 4 if rest else 0.0
        return out

    def _holes(self, m8: np.ndarray) -> tuple[int, float]:
        """Background regions (4-connected) that do not touch the border: what a flood
        fill from a zero frame around the image leaves (as `fill_holes` finds them)."""
        framed = cv2.copyMakeBorder(m8, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        cv2.floodFill(framed, None, (0, 0), 1, flags=4)
        holes = (framed == 0).view(np.uint8)
        area = np.count_nonzero(holes)
        if area == 0:
            return 0, 0.0
        return cv2.connectedComponents(holes, connectivity=4)[0] - 1, float(area)

    def _iou(self, mask: np.ndarray, area: float) -> float:
        if self.reference is None:
            return 0.0
        inter = float(np.count_nonzero(mask & self.reference))
        union = area + self.reference_area - inter
        return inter / union if union else 1.0


def _component_areas(m8: np.ndarray, connectivity: int) -> tuple[int, np.ndarray]:
    """Number of foreground components and their areas. `connectedComponentsWithStats`
    costs several times more than labelling plus counting on small masks."""
    n, labels = cv2.connectedComponents(m8, connectivity=connectivity)
    if n == 2:
        return 1, np.array([np.count_nonzero(m8)])
    return n - 1, np.bincount(labels.ravel(), minlength=n)[1:]

