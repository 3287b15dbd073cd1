"""A folder of real data: ROOT/<split>/images/* and ROOT/<split>/masks/*, paired by stem.

Everything is checked before anything is used: a researcher learns about every
missing mask, orphan image, size mismatch and unreadable file at once, in one list,
instead of failing on the first or training on bad pairs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from experiments.datasets.base import Sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DatasetError(Exception):
    """The dataset cannot be used; `problems` lists every reason, one per line."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root = root
        self.problems = problems
        super().__init__(f"{root}: {len(problems)} problem(s): " + "; ".join(problems))


@dataclass
class FolderScan:
    """What a split folder holds, and what is wrong with it."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _files_by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            continue
        if path.stem in found:
            problems.append(f"{path}: the stem {path.stem!r} is also {found[path.stem].name}")
            continue
        found[path.stem] = path
    return found


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageProblem(Exception):
    """Why an image file cannot be used; `str()` is the reason, without the path."""


def _read_image(path: Path) -> np.ndarray:
    """Every pixel of an image file, decoded whole; an ImageProblem when it cannot be
    (empty, truncated, corrupt, or a float image with NaN or infinite values, which the
    conversion to 8 bits would turn black without a word)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ImageProblem(f"cannot be read ({err.strerror or err})") from None
    if data.size == 0:
        raise ImageProblem("empty file")
    if data[:8].tobytes() == _PNG_SIGNATURE:
        # libpng writes its complaint about a cut file to stderr itself: such a file
        # must not reach it.
        _check_png_chunks(data.tobytes())
    with _opencv_quiet():
        pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageProblem("unreadable or empty image file (truncated, corrupt or of an unknown format)")
    if pixels.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        if bad:
            raise ImageProblem(f"{bad} NaN or infinite pixel values (a float image must be finite)")
    return pixels


def _check_png_chunks(data: bytes) -> None:
    """A PNG whole: every chunk complete with a matching CRC, up to IEND."""
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        end = offset + 8 + length + 4
        if end > len(data):
            raise ImageProblem(f"truncated PNG ({kind.decode('latin-1')} chunk cut short at byte {len(data)})")
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(data[offset + 4:end - 4]) != crc:
            raise ImageProblem(f"corrupt PNG (the {kind.decode('latin-1')} chunk at byte {offset} fails its CRC)")
        if kind == b"IEND":
            return
        offset = end
    raise ImageProblem(f"truncated PNG (no IEND chunk in its {len(data)} bytes)")


@contextlib.contextmanager
def _opencv_quiet():
    """OpenCV's own log lines ("[ WARN:0@...] ...") off while decoding: the problem is
    reported once, in the dataset's words."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def scan_split(root: Path, split: str) -> FolderScan:
    """Pair images with masks and check every pair, collecting every problem."""
    scan = FolderScan()
    images_dir, masks_dir = root / split / "images", root / split / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            scan.problems.append(f"{folder}: missing folder")
    if scan.problems:
        return scan
    images = _files_by_stem(images_dir, scan.problems)
    masks = _files_by_stem(masks_dir, scan.problems)
    for stem in sorted(set(images) - set(masks)):
        scan.problems.append(f"{images[stem]}: no mask (expected {masks_dir}/{stem}.png or another image type)")
    for stem in sorted(set(masks) - set(images)):
        scan.problems.append(f"{masks[stem]}: mask without an image")
    for stem in sorted(set(images) & set(masks)):
        image_path, mask_path = images[stem], masks[stem]
        shapes = []
        for path in (image_path, mask_path):
            try:
                shapes.append(_read_image(path).shape[:2])
            except ImageProblem as problem:
                scan.problems.append(f"{path}: {problem}")
                shapes.append(None)
        if None in shapes:
            continue
        if shapes[0] != shapes[1]:
            scan.problems.append(
                f"{mask_path}: mask is {shapes[1][1]}x{shapes[1][0]} but its image is {shapes[0][1]}x{shapes[0][0]}"
            )
            continue
        scan.pairs.append((image_path, mask_path))
    if not scan.pairs and not scan.problems:
        scan.problems.append(f"{images_dir}: no images")
    return scan


@dataclass(frozen=True)
class Description:
    expression: str
    target: str


def read_manifest(path: Path) -> dict[str, Description]:
    """Per-sample referring expressions: CSV with a header (stem, expression[, target])
    or JSONL with the same keys."""
    if not path.is_file():
        raise DatasetError(path, [f"{path}: no such manifest file"])
    rows: list[dict] = []
    problems: list[str] = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}: invalid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: expected an object")
                continue
            rows.append({**row, "_line": number})
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), 2):
                rows.append({**row, "_line": number})
    found: dict[str, Description] = {}
    for row in rows:
        stem, expression = row.get("stem"), row.get("expression")
        if not stem or not expression:
            problems.append(f"{path}:{row['_line']}: needs 'stem' and 'expression'")
            continue
        found[str(stem)] = Description(str(expression), str(row.get("target") or expression))
    if problems:
        raise DatasetError(path, problems)
    return found


def folder_split(
    root: Path,
    split: str,
    expression: str,
    target: str,
    manifest: Path | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """The samples of one split, after every pair has been checked."""
    scan = scan_split(root, split)
    if scan.problems:
        raise DatasetError(root / split, scan.problems)
    described = read_manifest(manifest) if manifest is not None else {}
    pairs = scan.pairs[:limit] if limit else scan.pairs
    samples = []
    for image_path, mask_path in pairs:
        try:
            pixels, mask = _read_image(image_path), _read_image(mask_path)
        except ImageProblem as problem:  # changed since the scan
            raise DatasetError(root / split, [f"{image_path.stem}: {problem}"]) from None
        samples.append(
            Sample(
                id=f"{split}/{image_path.stem}",
                image=_to_rgb(pixels),
                mask=_to_binary(mask),
                expression=described.get(image_path.stem, Description(expression, target)).expression,
                target=described.get(image_path.stem, Description(expression, target)).target,
            )
        )
    return samples


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype != np.uint8:
        # 16-bit microscopy and tif images: stretch to 8 bits per image.
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def _to_binary(mask: np.ndarray) -> np.ndarray:
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0
