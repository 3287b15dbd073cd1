"""The built-in referring-segmentation dataset, generated procedurally.

Every image holds several kinds of structure (thin branching vessels, blobs with
holes, rings, boxes) over a mottled background, with out-of-focus copies of every
kind (pale, not part of any target, as the choroidal vessels behind retinal ones),
speckle, blur, noise and uneven illumination. One kind is the target; its mask is
the ground truth (the visible pixels of every in-focus instance of that kind).

Each image is also drawn under one *condition* (faint, thin, crowded, in a dark
part, ...), made so that the same local evidence means different things under
different conditions: a faint target is paler than in a plain image, close to its
out-of-focus copies, and so are the weak members of a crowd, a thin vessel after
blur, a target in a dark or glaring part; small objects look like speckle; a thick
vessel's central reflex splits it in two. A model that sees locally, as the embedded
one does, segments such an image better when its prompt names the condition, and
the condition shows in the image itself, in global statistics (contrast,
brightness, noise, scale): that gives a prompt-choosing agent something real to
learn, spread over several conditions rather than one.

By default every image of a kind has the same referring expression ("the vessels"),
as a researcher's own data has ("the blood vessels" for every image): nothing in
the query gives the condition away. `dataset.expressions: per_image` gives each
image an expression that names its condition ("the faint vessels"), as an annotator
who says what makes an image hard would; that expression is one of the candidate
prompts, so there the image's own expression is the baseline to beat.

Every sample is generated from its own random stream, seeded by (seed, split,
index), so a sample is the same whatever the split size or sample limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from experiments.datasets.base import SPLITS, Sample
from sa2va_contract.config import DatasetConfig

KINDS = ("vessels", "blobs", "rings", "boxes")
_LINE_KINDS = ("vessels", "rings")
_OBJECT_KINDS = ("blobs", "rings", "boxes")
#: How often each kind is the target: vessels, as in the real use case, most often.
_TARGET_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
_SPLIT_CODE = {split: code for code, split in enumerate(SPLITS)}

#: Direction and strength of each kind's colour change against the background:
#: vessels and the clutter that mimics them are dark, blobs bright, rings and boxes tinted.
_KIND_COLOUR = {
    "vessels": np.array([-0.42, -0.30, -0.14], np.float32),
    "blobs": np.array([0.30, 0.30, 0.10], np.float32),
    "rings": np.array([-0.12, 0.22, 0.28], np.float32),
    "boxes": np.array([0.14, -0.16, 0.26], np.float32),
}


@dataclass(frozen=True)
class Condition:
    """What makes an image hard, and the expression that describes it."""

    name: str
    template: str
    kinds: tuple[str, ...]
    weight: float


CONDITIONS = (
    Condition("plain", "the {target}", KINDS, 2.0),
    Condition("faint", "the faint {target}", KINDS, 1.0),
    Condition("thin", "the thin {target}", _LINE_KINDS, 1.0),
    Condition("thick", "the thick {target}", _LINE_KINDS, 1.0),
    Condition("small", "the small {target}", _OBJECT_KINDS, 1.0),
    Condition("large", "the large {target}", _OBJECT_KINDS, 1.0),
    Condition("dark_part", "the {target} in the dark part of the image", KINDS, 1.0),
    Condition("bright_part", "the {target} in the bright part of the image", KINDS, 1.0),
    Condition("noisy", "the {target} in the noisy image", KINDS, 1.0),
    Condition("blurry", "the blurry {target}", KINDS, 1.0),
    Condition("crowded", "all {target}", KINDS, 1.0),
)
CONDITION_BY_NAME = {c.name: c for c in CONDITIONS}
#: The expression that describes no condition: what a model is asked by default.
PLAIN_TEMPLATE = CONDITION_BY_NAME["plain"].template


def builtin_split(config: DatasetConfig, split: str, memo_dir: Path | None = None) -> list[Sample]:
    """The first `sizes.<split>` samples of a split, at most `limit` of them; with
    `memo_dir`, generated once there for every process (`experiments.datasets.memo`)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    count = getattr(config.sizes, split)
    if config.limit is not None:
        count = min(count, config.limit)

    def draw(start: int, stop: int) -> list[Sample]:
        return [builtin_sample(config, split, index) for index in range(start, stop)]

    if memo_dir is None or count == 0:
        return draw(0, count)
    from experiments.datasets.memo import memoised_split

    return memoised_split(memo_dir, config.seed, config.image_size, config.expressions, split, count, draw)


def builtin_sample(config: DatasetConfig, split: str, index: int) -> Sample:
    """Sample `index` of a split; indices past the split size continue the same
    stream (the embedded model trains on more images than the split holds)."""
    sample, _ = generate(config.seed, split, index, config.image_size, config.expressions)
    return sample


def generate(seed: int, split: str, index: int, size: int, expressions: str = "fixed") -> tuple[Sample, Condition]:
    """One sample and the condition it was drawn under; `expressions` "fixed" gives
    the sample its kind's one expression, "per_image" the one naming its condition."""
    entropy = [seed % 2**32, _SPLIT_CODE[split], index]
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    kind = KINDS[rng.choice(len(KINDS), p=_TARGET_WEIGHTS)]
    options = [c for c in CONDITIONS if kind in c.kinds]
    weights = np.array([c.weight for c in options])
    condition = options[rng.choice(len(options), p=weights / weights.sum())]
    # A rare draw can leave the target hidden under other objects: draw again from
    # the same stream, which keeps the sample deterministic.
    while True:
        image, mask = _Scene(rng, size, kind, condition.name).render()
        if np.count_nonzero(mask) >= 8:
            break
    template = condition.template if expressions == "per_image" else PLAIN_TEMPLATE
    sample = Sample(
        id=f"builtin-{split}-{index:05d}",
        image=image,
        mask=mask,
        expression=template.replace("{target}", kind),
        target=kind,
        condition=condition.name,
    )
    return sample, condition


class _Scene:
    """One image under construction: background, objects in drawing order, then the
    imaging effects (illumination, blur, noise, speckle)."""

    def __init__(self, rng: np.random.Generator, size: int, target: str, condition: str) -> None:
        self.rng = rng
        self.size = size
        self.scale = size / 128.0
        self.target = target
        self.condition = condition
        self.signal = np.zeros((size, size, 3), np.float32)
        self.label = np.zeros((size, size), np.int8)
        # Faint images lower every structure's contrast, out-of-focus copies included,
        # to between that of a plain image's targets and its out-of-focus copies: a
        # model asked plainly loses part of a faint target, not all of it (at 0.22 to
        # 0.32 it lost nearly all, and faint images held two thirds of the headroom).
        self.contrast = rng.uniform(0.42, 0.55) if condition == "faint" else 1.0

    # --- drawing ------------------------------------------------------------------

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        background = self._background()
        self._ghosts()
        others = [k for k in KINDS if k != self.target]
        present = [self.target] + list(rng.choice(others, size=rng.integers(1, 3), replace=False))
        layers = []
        for kind in present:
            layers += [(kind, draw) for draw in self._instances(kind, kind == self.target)]
        # Random drawing order: objects occlude and touch each other whatever their kind.
        for i in rng.permutation(len(layers)):
            kind, (alpha, hard) = layers[i]
            self.signal[hard] = 0.0
            self._add(alpha, kind)
            self.label[hard] = KINDS.index(kind) + 1
        image = self._imaging(background + self.signal)
        return image, self.label == KINDS.index(self.target) + 1

    def _background(self) -> np.ndarray:
        rng = self.rng
        palette = np.array([[0.72, 0.40, 0.22], [0.52, 0.52, 0.50], [0.34, 0.50, 0.52]], np.float32)
        colour = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.15)
        mottling = 1.0 + 0.10 * self._smooth_field(6)
        return mottling[..., None] * colour

    def _smooth_field(self, cells: int) -> np.ndarray:
        """Low-frequency noise in about [-1, 1]."""
        coarse = self.rng.normal(0, 0.6, (cells, cells)).astype(np.float32)
        return cv2.resize(coarse, (self.size, self.size), interpolation=cv2.INTER_CUBIC)

    def _ghosts(self) -> None:
        """Pale out-of-focus copies of every kind, drawn under the objects and part of
        no mask: what faint and weak targets must be told apart from."""
        rng = self.rng
        for _ in range(rng.integers(3, 7)):
            alpha = np.zeros((self.size, self.size), np.float32)
            for x0, y0, x1, y1, w, m in self._walk(rng.uniform(30, 80), int(rng.integers(1, 3)), 1, branch=0.04, dips=0.8):
                cv2.line(alpha, (x0, y0), (x1, y1), float(m), w)
            self._add(alpha * self._ghost_level(), "vessels")
        for _ in range(rng.integers(1, 4)):
            kind = _OBJECT_KINDS[rng.integers(len(_OBJECT_KINDS))]
            alpha, _ = {"blobs": self._blob, "rings": self._ring, "boxes": self._box}[kind]("plain")
            self._add(alpha * self._ghost_level(), kind)

    def _ghost_level(self) -> float:
        return float(self.rng.uniform(0.18, 0.32))

    def _add(self, alpha: np.ndarray, kind: str) -> None:
        colour = _KIND_COLOUR[kind] * self.rng.uniform(0.85, 1.15, 3).astype(np.float32)
        self.signal += alpha[..., None] * colour * self.contrast

    def _instances(self, kind: str, is_target: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """(alpha, hard mask) per instance; conditions change only the target's instances."""
        rng = self.rng
        cond = self.condition if is_target else "plain"
        if kind == "vessels":
            trees = rng.integers(1, 3) if is_target else 1
            if cond == "crowded":
                trees = rng.integers(4, 6)
            return [self._vessel_tree(cond) for _ in range(trees)]
        count = {"small": rng.integers(9, 17), "large": rng.integers(1, 3), "crowded": rng.integers(7, 12)}.get(
            cond, rng.integers(2, 4)
        )
        draw = {"blobs": self._blob, "rings": self._ring, "boxes": self._box}[kind]
        out = []
        for _ in range(count):
            alpha, hard = draw(cond)
            if cond == "crowded":
                alpha = alpha * self._crowd_level()
            out.append((alpha, hard))
        return out

    def _crowd_level(self) -> float:
        """Crowds mix salient instances with ones as pale as out-of-focus copies:
        "all" of them count."""
        return float(self.rng.uniform(0.25, 0.45) if self.rng.random() < 0.6 else self.rng.uniform(0.6, 1.0))

    def _walk(self, length: float, width: int, min_width: int, branch: float, dips: float):
        """A branching random walk from the border inwards or from inside: segments
        (x0, y0, x1, y1, width, contrast) where contrast dips in low-contrast stretches."""
        rng, s = self.rng, self.size
        if rng.random() < 0.6:
            side = rng.integers(4)
            t = rng.uniform(0.15, 0.85) * s
            x, y, angle = [(t, 0.0, math.pi / 2), (t, s - 1.0, -math.pi / 2), (0.0, t, 0.0), (s - 1.0, t, math.pi)][side]
            angle += rng.normal(0, 0.35)
        else:
            x, y, angle = rng.uniform(0.2, 0.8) * s, rng.uniform(0.2, 0.8) * s, rng.uniform(0, 2 * math.pi)
        step = 2.0 * self.scale
        stack = [(x, y, angle, width, 0, length * self.scale)]
        segments = []
        while stack:
            x, y, angle, w, depth, budget = stack.pop()
            n_dips = rng.poisson(dips)
            centres = rng.uniform(0, budget, n_dips)
            halves = rng.uniform(4, 10, n_dips) * self.scale
            depths = rng.uniform(0.65, 0.9, n_dips)
            travelled = 0.0
            while travelled < budget:
                angle += rng.normal(0, 0.18)
                nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
                dip = depths * np.exp(-(((travelled - centres) / halves) ** 2))
                contrast = 1.0 - (dip.max() if n_dips else 0.0)
                segments.append((int(round(x)), int(round(y)), int(round(nx)), int(round(ny)), w, contrast))
                if not (-2 <= nx <= s + 1 and -2 <= ny <= s + 1):
                    break
                if depth < 3 and rng.random() < branch:
                    turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                    stack.append((nx, ny, angle + turn, max(min_width, w - 1), depth + 1, budget * rng.uniform(0.4, 0.7)))
                x, y = nx, ny
                travelled += step
        return segments

    def _vessel_tree(self, cond: str) -> tuple[np.ndarray, np.ndarray]:
        rng, s = self.rng, self.scale
        if cond == "thin":
            width, min_width = 1, 1
        elif cond == "thick":
            width, min_width = int(round(rng.integers(5, 8) * s)), max(3, int(round(3 * s)))
        else:
            width, min_width = max(1, int(round(rng.integers(1, 4) * s))), 1
        alpha = np.zeros((self.size, self.size), np.float32)
        hard = np.zeros((self.size, self.size), np.uint8)
        reflex = np.zeros((self.size, self.size), np.float32)
        dips = 2.0 if cond == "thin" else 1.2
        for x0, y0, x1, y1, w, contrast in self._walk(rng.uniform(70, 130), width, min_width, branch=0.07, dips=dips):
            cv2.line(alpha, (x0, y0), (x1, y1), float(contrast), w)
            cv2.line(hard, (x0, y0), (x1, y1), 1, w)
            if w >= 4:
                # The central light reflex of wide vessels: a bright stripe down the middle.
                cv2.line(reflex, (x0, y0), (x1, y1), 0.9, max(1, w // 3))
        alpha *= 1.0 - reflex
        strength = self._crowd_level() if cond == "crowded" else rng.uniform(0.7, 1.0)
        return alpha * strength, hard.astype(bool)

    def _centre(self) -> tuple[float, float]:
        return tuple(self.rng.uniform(0.1, 0.9, 2) * self.size)

    def _blob(self, cond: str) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        radius = {"small": (1.5, 3.5), "large": (22.0, 34.0)}.get(cond, (7.0, 14.0))
        r = rng.uniform(*radius) * self.scale
        cx, cy = self._centre()
        theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        bumps = sum(rng.uniform(0, 0.15) * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4))
        points = np.stack([cx + r * (1 + bumps) * np.cos(theta), cy + r * (1 + bumps) * np.sin(theta)], 1)
        hard = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(hard, [np.round(points).astype(np.int32)], 1)
        if r >= 6 * self.scale:
            for _ in range(rng.integers(0, 3)):
                hx, hy = cx + rng.uniform(-0.4, 0.4) * r, cy + rng.uniform(-0.4, 0.4) * r
                axes = (max(1, int(r * rng.uniform(0.12, 0.3))), max(1, int(r * rng.uniform(0.12, 0.3))))
                cv2.ellipse(hard, (int(hx), int(hy)), axes, rng.uniform(0, 180), 0, 360, 0, -1)
        return hard.astype(np.float32) * rng.uniform(0.7, 1.0), hard.astype(bool)

    def _ring(self, cond: str) -> tuple[np.ndarray, np.ndarray]:
        rng, s = self.rng, self.scale
        radius = {"small": (3.0, 5.0), "large": (24.0, 38.0)}.get(cond, (8.0, 16.0))
        thickness = {"thin": (1, 2), "thick": (5, 8), "small": (1, 2), "large": (3, 5)}.get(cond, (2, 4))
        r = rng.uniform(*radius) * s
        axes = (max(2, int(r)), max(2, int(r * rng.uniform(0.6, 1.0))))
        hard = np.zeros((self.size, self.size), np.uint8)
        t = max(1, int(round(rng.integers(*thickness) * s)))
        cx, cy = self._centre()
        cv2.ellipse(hard, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, t)
        return hard.astype(np.float32) * rng.uniform(0.7, 1.0), hard.astype(bool)

    def _box(self, cond: str) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        side = {"small": (3.0, 6.0), "large": (30.0, 50.0)}.get(cond, (9.0, 20.0))
        w, h = rng.uniform(*side, 2) * self.scale
        cx, cy = self._centre()
        corners = cv2.boxPoints(((cx, cy), (w, h), rng.uniform(0, 90)))
        hard = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(hard, [np.round(corners).astype(np.int32)], 1)
        return hard.astype(np.float32) * rng.uniform(0.7, 1.0), hard.astype(bool)

    # --- imaging ------------------------------------------------------------------

    def _imaging(self, scene: np.ndarray) -> np.ndarray:
        rng, n, cond = self.rng, self.size, self.condition
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        # Uneven illumination: a gentle gradient, or a dark part where contrast fades.
        angle = rng.uniform(0, 2 * math.pi)
        along = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        low = rng.uniform(0.08, 0.18) if cond == "dark_part" else rng.uniform(0.8, 0.95)
        ramp = np.clip((along - rng.uniform(-0.15, 0.15)) / 0.3 + 0.5, 0, 1)
        image = scene * (1.0 - (1.0 - low) * ramp)[..., None]
        # Glare: a bright part that washes structure out towards white.
        if cond == "bright_part":
            gx, gy = rng.uniform(0.25, 0.75, 2)
            sigma = rng.uniform(0.18, 0.28)
            glare = rng.uniform(0.7, 0.92) * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))
            image = image + glare[..., None] * (1.0 - image)
        sigma = rng.uniform(1.5, 2.2) if cond == "blurry" else rng.uniform(0.5, 1.0)
        image = cv2.GaussianBlur(image, (0, 0), sigma * self.scale)
        noise_sd = rng.uniform(0.05, 0.08) if cond == "noisy" else rng.uniform(0.01, 0.025)
        image = image + rng.normal(0, noise_sd, (n, n, 1)).astype(np.float32)
        image = self._speckle(image, cond == "noisy")
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)

    def _speckle(self, image: np.ndarray, heavy: bool) -> np.ndarray:
        """Isolated dots of one to three pixels, grey or in the colour of a kind: the
        coloured ones look like small objects."""
        rng, n = self.rng, self.size
        count = int((rng.integers(250, 450) if heavy else rng.integers(20, 50)) * self.scale**2)
        dots = np.zeros((n, n, 3), np.float32)
        kinds = [_KIND_COLOUR[k] for k in KINDS] + [np.full(3, 0.6, np.float32), np.full(3, -0.6, np.float32)]
        for _ in range(count):
            x, y = rng.integers(0, n, 2)
            side = int(rng.choice([1, 1, 2, 2, 3]))
            colour = kinds[rng.integers(len(kinds))] * rng.uniform(0.4, 0.9)
            dots[y:y + side, x:x + side] = colour
        return image + dots
