"""Built-in data sets from installed packages, each a distinct visual domain.

digits    scikit-learn's 8x8 digits upscaled to 32x32 PNG; label = the digit.
fashion   Fashion-MNIST test split (10,000 28x28 PNG, Debian dataset-fashion-mnist);
          `fashion-train` is the 60,000-image training split; label = class name.
textures  64x64 PNG crops of GIMP patterns (Debian gimp-data); label = pattern family,
          the pattern's folder: legacy (GIMP's old geometric tiles), sky, stone, water, wood.
          scikit-image's brick and gravel join stone. Only families of at least
          MIN_FAMILY_PATTERNS patterns are used: a label must name a visual family that
          several patterns show, so folders of one or two patterns (animal, fabric, food,
          paper, plant), the loose top-level patterns of gimp-data-extras (no family) and
          scikit-image's grass (a plant, no stone) are left out.
photos    128x128 JPEG crops of OpenCV's sample photos (scaled to <= 512 px) (Debian
          opencv-doc) and of scikit-image's photos; label = the source's scene category in
          PHOTO_CATEGORIES (calibration chessboards, text, graphics, people and animals,
          objects, scenes, science).

Held out, never streamed (targets for snapshots, benchmarks/snapshot.py; docs/snapshots.md):
textures-heldout, photos-heldout   crops of the patterns / photos that `textures` and
          `photos` leave out: whole pictures with their near copies, a quarter of each class
          (streamer/sources/holdout.py).
digits-opencv   OpenCV's sheet of 5,000 handwritten digits (MNIST-derived, 20x20 cells,
          opencv-doc's digits.png), upscaled to 32x32 grey PNG: other writers, other scanner,
          other pre-processing than `digits`. The sheet is no `photos` source.
fashion-train   Fashion-MNIST's training split; the streamed `fashion` is the test split
          (the continual benchmark's forgetting setting streams it: not a target there).
Never stream a held-out source: it would leak the targets that show tailoring works.

Labels are coarse on purpose: the evaluation scores probe images (10-20 % of a stream of a
few thousand) by kNN and linear probes over labels, which needs dozens of images per class.
Items go round-robin over the classes, each a random crop of a random source of that class,
so every prefix of the stream is class-balanced. Order and crops are seeded, so every run
yields the same items with the same keys.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from streamer.sources import Item, MissingDataError
from streamer.sources.holdout import Source, distinct, split_sources

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
GIMP_PATTERNS = Path("/usr/share/gimp/2.0/patterns")
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
FASHION_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
SKIMAGE_STONES = ("brick", "gravel")  # join GIMP's Stone family
MIN_FAMILY_PATTERNS = 3  # a pattern folder with fewer is no family to label by
TEXTURE_ITEMS = 2736  # as many as 16 crops of each pattern gave: demo plans still fit
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins",
    "hubble_deep_field", "immunohistochemistry", "moon", "rocket", "retina",
)  # fmt: skip
# Scene category of every photo (lowercase file stem or scikit-image name). A stem missing
# here (another opencv-doc version) belongs to no category and is skipped.
PHOTO_CATEGORIES: dict[str, tuple[str, ...]] = {
    "calibration": (
        "chessboard", "left01", "left02", "left03", "left04", "left05", "left06", "left07",
        "left08", "left09", "left11", "left12", "left13", "left14", "right01", "right02",
        "right03", "right04", "right05", "right06", "right07", "right08", "right09",
        "right11", "right12", "right13", "right14",
    ),
    "text": (
        "imagetextn", "imagetextr", "licenseplate_motion", "notes", "sudoku",
        "text_defocus", "text_motion",
    ),
    "graphics": (
        "aloegt", "blender_suzanne1", "blender_suzanne2", "blox", "cards", "detect_blob",
        "ellipses", "gradient", "happyfish", "linuxlogo", "mask", "ml", "opencv-logo",
        "opencv-logo-white", "pic1", "pic2", "pic3", "pic4", "pic5", "pic6", "templ", "tmpl",
        "windowslogo",
    ),
    "people_animals": (
        "astronaut", "baboon", "basketball1", "basketball2", "butterfly", "camera", "chelsea",
        "chicky_512", "messi5", "squirrel_cls",
    ),
    "objects": (
        "aloel", "aloer", "apple", "board", "box", "box_in_scene", "coffee", "coins",
        "ela_modified", "ela_original", "fruits", "left", "orange", "pca_test1", "right",
        "rubberwhale1", "rubberwhale2", "smarties", "stuff",
    ),
    "scenes": (
        "aero1", "aero3", "building", "graf1", "graf3", "home", "leuvena", "leuvenb", "rocket",
        "starry_night",
    ),
    "science": ("hubble_deep_field", "immunohistochemistry", "moon", "retina"),
}  # fmt: skip
PHOTO_EXCLUDED = ("digits",)  # OpenCV's handwritten-digit sheet: builtin:digits-opencv, never a photo
OPENCV_DIGITS_CELL, OPENCV_DIGITS_PER_CLASS = 20, 500  # digits.png: 50 rows x 100 cells, 5 rows per digit
PHOTO_ITEMS = 1616  # 16 crops per source on average, as before
SEED = 0
PHOTO_MAX_SIDE = 512  # photos are scaled down to this first, so crops show whole objects


def _require(path: Path, package: str) -> None:
    if not path.is_dir():
        raise MissingDataError(f"{path} is missing: run `apt-get install {package}`")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from grey, grey+alpha, RGB or RGBA pixels (alpha dropped)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, :-1]
    return np.ascontiguousarray(np.broadcast_to(pixels, (*pixels.shape[:2], 3)), dtype=np.uint8)


def digits() -> Iterator[Item]:
    """scikit-learn's 1,797 handwritten digits, 32x32 grey PNG."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for i, (pixels, target) in enumerate(zip(data.images, data.target, strict=True)):
        image = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8))
        pixels32 = np.asarray(image.resize((32, 32), Image.BILINEAR))
        yield Item(_png(pixels32), "png", str(target), f"digits-{i:06d}")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic with the rank, sizes, uint8 data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    rank = data[3]
    shape = struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def fashion(split: str = "t10k") -> Iterator[Item]:
    """Fashion-MNIST `split` ("t10k" or "train"), 28x28 grey PNG."""
    _require(FASHION_DIR, "dataset-fashion-mnist")
    images = _idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = _idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz")
    prefix = "fashion" if split == "t10k" else f"fashion-{split}"
    return (
        Item(_png(pixels), "png", FASHION_CLASSES[label], f"{prefix}-{i:06d}")
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True))
    )


def read_gimp_pattern(data: bytes) -> np.ndarray:
    """Pixels (HxWxC uint8) of a GIMP .pat file.

    Header (big-endian u32s): header size, version (1), width, height, bytes per pixel,
    magic "GPAT", then the NUL-terminated name up to the header size; raw pixels follow.
    """
    header_size, version, width, height, depth = struct.unpack(">5I", data[:20])
    if data[20:24] != b"GPAT" or version != 1 or depth not in (1, 2, 3, 4):
        raise ValueError("not a GIMP pattern (version 1, GPAT)")
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * depth, offset=header_size)
    return pixels.reshape(height, width, depth)


def _crop(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random size x size crop; a smaller image is tiled first (patterns are seamless)."""
    height, width = pixels.shape[:2]
    if height < size or width < size:
        pixels = np.tile(pixels, (-(-size // height), -(-size // width), 1))
        height, width = pixels.shape[:2]
    y = rng.integers(0, height - size + 1)
    x = rng.integers(0, width - size + 1)
    return pixels[y : y + size, x : x + size]


def _skimage(names: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled images by name, skipping any this install lacks."""
    import skimage.data

    found = []
    for name in names:
        try:
            found.append((name, _rgb(getattr(skimage.data, name)())))
        except (AttributeError, OSError, ValueError):
            continue
    return found


def _round_robin(
    classes: dict[str, list[np.ndarray]],
    count: int,
    prefix: str,
    ext: str,
    crop: Callable[[np.ndarray, np.random.Generator], bytes],
) -> Iterator[Item]:
    """`count` crops, cycling through the classes (sorted): a crop of a random source each."""
    rng = np.random.default_rng(SEED)
    labels = sorted(label for label, sources in classes.items() if sources)
    for i in range(count):
        label = labels[i % len(labels)]
        sources = classes[label]
        yield Item(crop(sources[rng.integers(len(sources))], rng), ext, label, f"{prefix}-{i:06d}")


def texture_families() -> dict[str, list[Source]]:
    """(name, pixels) of the patterns of each family (lowercase folder name) with enough distinct
    patterns, held-out ones included (`holdout.split_sources`)."""
    families: dict[str, list[Source]] = {}
    for path in sorted(GIMP_PATTERNS.glob("*/*.pat")):
        pixels = _rgb(read_gimp_pattern(path.read_bytes()))
        families.setdefault(path.parent.name.lower(), []).append((path.stem.lower(), pixels))
    if "stone" in families:
        families["stone"] += _skimage(SKIMAGE_STONES)
    families = {name: distinct(found) for name, found in families.items()}
    return {name: found for name, found in families.items() if len(found) >= MIN_FAMILY_PATTERNS}


def textures(count: int = TEXTURE_ITEMS, size: int = 64, heldout: bool = False) -> Iterator[Item]:
    """`count` 64x64 PNG crops of GIMP patterns, labelled and balanced by pattern family:
    of the streamed patterns, or of the held-out ones (`heldout`)."""
    _require(GIMP_PATTERNS, "gimp-data")
    prefix = "textures-heldout" if heldout else "textures"
    return _round_robin(split_sources(texture_families(), heldout), count, prefix, "png",
                        lambda p, rng: _png(_crop(p, size, rng)))


def _shrink(image: Image.Image, longest: int = PHOTO_MAX_SIDE) -> np.ndarray:
    """RGB pixels with the longer side at most `longest` (JPEGs decode scaled down: fast)."""
    image.draft("RGB", (longest, longest))
    image = image.convert("RGB")
    image.thumbnail((longest, longest), Image.BILINEAR)
    return np.asarray(image)


def photo_categories() -> dict[str, list[Source]]:
    """(stem, shrunk pixels) of the sample photos of each PHOTO_CATEGORIES category, held-out ones
    included (`holdout.split_sources`)."""
    category = {stem: name for name, stems in PHOTO_CATEGORIES.items() for stem in stems}
    found: dict[str, list[Source]] = {name: [] for name in PHOTO_CATEGORIES}
    for path in sorted(OPENCV_DATA.iterdir()):
        stem = path.stem.lower()
        if path.suffix.lower() in (".jpg", ".png") and stem in category:
            with Image.open(path) as image:
                found[category[stem]].append((stem, _shrink(image)))
    for name, pixels in _skimage(SKIMAGE_PHOTOS):
        found[category[name]].append((name, _shrink(Image.fromarray(pixels))))
    return {name: distinct(sources) for name, sources in found.items()}


def photos(count: int = PHOTO_ITEMS, size: int = 128, heldout: bool = False) -> Iterator[Item]:
    """`count` 128x128 JPEG crops of sample photos, labelled and balanced by scene category:
    of the streamed photos, or of the held-out ones (`heldout`).

    Each crop is a random quarter to all of the photo's short side, scaled to `size`.
    """
    _require(OPENCV_DATA, "opencv-doc")

    def crop(pixels: np.ndarray, rng: np.random.Generator) -> bytes:
        short = min(pixels.shape[:2])
        side = max(min(size, short), int(short * rng.uniform(0.25, 1.0)))
        region = Image.fromarray(_crop(pixels, side, rng)).resize((size, size), Image.BILINEAR)
        return _jpeg(np.asarray(region))

    prefix = "photos-heldout" if heldout else "photos"
    return _round_robin(split_sources(photo_categories(), heldout), count, prefix, "jpg", crop)


def opencv_digits() -> Iterator[Item]:
    """OpenCV's 5,000 handwritten digits as 32x32 grey PNG, round-robin over the digits."""
    _require(OPENCV_DATA, "opencv-doc")
    with Image.open(OPENCV_DATA / "digits.png") as image:
        sheet = np.asarray(image.convert("L"))
    cell = OPENCV_DIGITS_CELL
    columns = sheet.shape[1] // cell
    rows_per_class = OPENCV_DIGITS_PER_CLASS // columns
    for i in range(10 * OPENCV_DIGITS_PER_CLASS):
        digit, n = i % 10, i // 10
        row, column = digit * rows_per_class + n // columns, n % columns
        pixels = sheet[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell]
        pixels32 = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR))
        yield Item(_png(pixels32), "png", str(digit), f"digits-opencv-{i:06d}")


BUILTINS: dict[str, tuple[Callable[[], Iterator[Item]], Path | None]] = {
    "digits": (digits, None),
    "fashion": (fashion, FASHION_DIR),
    "fashion-train": (lambda: fashion("train"), FASHION_DIR),
    "textures": (textures, GIMP_PATTERNS),
    "photos": (photos, OPENCV_DATA),
    "textures-heldout": (lambda: textures(heldout=True), GIMP_PATTERNS),
    "photos-heldout": (lambda: photos(heldout=True), OPENCV_DATA),
    "digits-opencv": (opencv_digits, OPENCV_DATA),
}


def available_builtins() -> list[str]:
    """Names of the built-in data sets whose data is installed."""
    return [name for name, (_, data) in BUILTINS.items() if data is None or data.is_dir()]


def builtin(name: str) -> Iterator[Item]:
    """Items of built-in data set `name`; MissingDataError names the package to install."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin {name!r}; known: {', '.join(BUILTINS)}")
    return BUILTINS[name][0]()
