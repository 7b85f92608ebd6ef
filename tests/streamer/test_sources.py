"""Image sources for `tailord produce`: builtins, directories, tar archives."""

from __future__ import annotations

import io
import struct
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from streamer.decode import decode_record, sniff_format
from streamer.limits import DecodeLimits
from streamer.produce import produce
from streamer.sources import MissingDataError, open_source
from streamer.sources import builtin as builtin_module
from streamer.sources.builtin import (
    BUILTINS,
    OPENCV_DATA,
    PHOTO_CATEGORIES,
    PHOTO_EXCLUDED,
    SKIMAGE_PHOTOS,
    available_builtins,
    builtin,
    photo_categories,
    read_gimp_pattern,
    texture_families,
)
from streamer.sources.directory import directory
from streamer.sources.holdout import NEAR_COPY, picture_groups, split_sources
from streamer.sources.tarball import tarball

PACKAGES = {"fashion": "dataset-fashion-mnist", "textures": "gimp-data", "photos": "opencv-doc",
            "textures-heldout": "gimp-data", "photos-heldout": "opencv-doc", "digits-opencv": "opencv-doc"}
FORMATS = {"png": "png", "jpg": "jpeg"}


def encoded(fmt: str, shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (shade, 0, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "count", "some_labels"),
    [
        ("digits", 60, {str(d) for d in range(10)}),
        ("fashion", 60, {"ankle_boot", "tshirt", "trouser"}),
        ("textures", 180, {"legacy", "sky", "stone", "water", "wood"}),
        ("photos", 120, set(PHOTO_CATEGORIES)),
        ("textures-heldout", 180, {"legacy", "sky", "stone", "water", "wood"}),
        ("photos-heldout", 120, set(PHOTO_CATEGORIES)),
        ("digits-opencv", 60, {str(d) for d in range(10)}),
    ],
)
def test_builtin_yields_decodable_labelled_images(name: str, count: int, some_labels: set) -> None:
    if name not in available_builtins():
        pytest.skip(f"apt-get install {PACKAGES[name]} to test builtin:{name}")
    items = list(islice(builtin(name), count))
    assert len(items) == count
    assert len({item.key for item in items}) == count
    assert all(item.key.startswith(f"{name}-") for item in items)
    assert some_labels <= {item.label for item in items}
    for item in items[:10]:
        assert sniff_format(item.encoded) == FORMATS[item.fmt_ext]
        (image,) = decode_record(item.encoded, [], DecodeLimits(), 32)
        assert tuple(image.image.shape) == (3, 32, 32)


@pytest.mark.parametrize("name", ["digits", "textures", "photos", "textures-heldout", "photos-heldout",
                                  "digits-opencv"])
def test_builtin_is_deterministic(name: str) -> None:
    if name not in available_builtins():
        pytest.skip(f"apt-get install {PACKAGES[name]} to test builtin:{name}")
    first, second = (list(islice(builtin(name), 5)) for _ in range(2))
    assert first == second


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("textures", {"legacy", "sky", "stone", "water", "wood"}),
        ("photos", set(PHOTO_CATEGORIES)),
    ],
)
def test_builtin_classes_are_few_and_balanced_in_any_prefix(name: str, labels: set) -> None:
    """The evaluation probes ~10-20 % of a domain by label: every class needs dozens."""
    if name not in available_builtins():
        pytest.skip(f"apt-get install {PACKAGES[name]} to test builtin:{name}")
    first, second = (list(islice(builtin(name), 600)) for _ in range(2))
    assert [(i.key, i.label) for i in first] == [(i.key, i.label) for i in second]
    assert [i.key for i in first] == [f"{name}-{n:06d}" for n in range(600)]
    counts = Counter(item.label for item in first)
    assert set(counts) == labels
    assert 3 <= len(counts) <= 8
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert min(counts.values()) >= 600 // len(counts) >= 60


def test_every_photo_has_one_category() -> None:
    if not OPENCV_DATA.is_dir():
        pytest.skip("apt-get install opencv-doc to test builtin:photos")
    stems = [stem for stems in PHOTO_CATEGORIES.values() for stem in stems]
    assert len(stems) == len(set(stems))
    present = {
        p.stem.lower() for p in OPENCV_DATA.iterdir() if p.suffix.lower() in (".jpg", ".png")
    }
    assert (present - set(PHOTO_EXCLUDED)) | set(SKIMAGE_PHOTOS) <= set(stems)
    assert not set(PHOTO_EXCLUDED) & set(stems), "the digit sheet is builtin:digits-opencv, never a photo"


@pytest.mark.parametrize("classes", [texture_families, photo_categories])
def test_held_out_sources_are_never_streamed(classes) -> None:
    """Every class splits into streamed and held-out pictures: both non-empty, all used, and no
    held-out source is a near copy of a streamed one (nor a named view of the same picture)."""
    if not OPENCV_DATA.is_dir() or "textures" not in available_builtins():
        pytest.skip("apt-get install opencv-doc gimp-data to test the held-out split")
    every = classes()
    streamed, heldout = split_sources(every, heldout=False), split_sources(every, heldout=True)
    for label, sources in every.items():
        assert streamed[label] and heldout[label], label
        assert len(streamed[label]) + len(heldout[label]) == len(sources)
        kept = {id(pixels) for pixels in streamed[label]}
        sides = [id(pixels) in kept for _, pixels in sources]
        for members in picture_groups(sources):
            assert len({sides[i] for i in members}) == 1, [sources[i][0] for i in members]


def test_near_copies_and_stereo_pairs_are_one_picture() -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2))
    recolour = np.ascontiguousarray(255 - a[:, :, ::-1])  # inverted: correlation -1, not a copy
    brighter = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)  # correlation ~1 >= NEAR_COPY
    sources = [("x", a), ("left07", b), ("y", recolour), ("z", brighter), ("right07", a[::-1].copy())]
    assert NEAR_COPY < 1
    assert picture_groups(sources) == [[0, 3], [1, 4], [2]]


def test_opencv_digits_are_the_sheet_cells() -> None:
    if not OPENCV_DATA.is_dir():
        pytest.skip("apt-get install opencv-doc to test builtin:digits-opencv")
    items = list(islice(builtin("digits-opencv"), 30))
    assert [item.label for item in items[:10]] == [str(d) for d in range(10)]
    sheet = np.asarray(Image.open(OPENCV_DATA / "digits.png").convert("L"))
    first_five = np.asarray(Image.fromarray(sheet[5 * 20:5 * 20 + 20, :20]).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(items[1].encoded))), first_five)


def test_digit_labels_match_the_data_set() -> None:
    assert [item.label for item in islice(builtin("digits"), 10)] == [str(i) for i in range(10)]


def test_missing_package_names_the_install_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(builtin_module, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist"):
        builtin("fashion")
    monkeypatch.setattr(builtin_module, "GIMP_PATTERNS", tmp_path / "absent")
    with pytest.raises(MissingDataError, match="apt-get install gimp-data"):
        builtin("textures")


def test_unknown_builtin_and_source() -> None:
    with pytest.raises(ValueError, match="known: digits"):
        builtin("nope")
    with pytest.raises(ValueError, match="neither builtin:NAME"):
        open_source("/no/such/place")
    with pytest.raises(ValueError, match="neither builtin:NAME"):
        produce("/no/such/place", "t", "127.0.0.1:1")
    assert set(available_builtins()) <= set(BUILTINS)


def test_gimp_pattern_reader() -> None:
    name = b"tiny\0"
    header = struct.pack(">5I", 24 + len(name), 1, 3, 2, 3) + b"GPAT" + name
    pixels = bytes(range(18))
    array = read_gimp_pattern(header + pixels)
    assert array.shape == (2, 3, 3)
    assert array[1, 2].tolist() == [15, 16, 17]
    with pytest.raises(ValueError, match="GPAT"):
        read_gimp_pattern(header.replace(b"GPAT", b"XXXX") + pixels)


def test_directory_labels_first_level_folders(tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog" / "deep").mkdir(parents=True)
    (tmp_path / "cat" / "a.png").write_bytes(encoded("png", 1))
    (tmp_path / "dog" / "deep" / "b.JPG").write_bytes(encoded("jpeg", 2))
    (tmp_path / "c.bmp").write_bytes(encoded("bmp", 3))
    (tmp_path / "notes.txt").write_text("not an image")
    items = list(directory(tmp_path))
    assert [(i.key, i.fmt_ext, i.label) for i in items] == [
        ("c", "bmp", None),
        ("cat/a", "png", "cat"),
        ("dog/deep/b", "jpg", "dog"),
    ]
    assert items[1].encoded == encoded("png", 1)
    source = open_source(str(tmp_path))
    assert source.name == tmp_path.name


def test_tarball_reads_image_members(tmp_path) -> None:
    path = tmp_path / "set.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in [
            ("./x/1.png", encoded("png")),
            ("2.webp", encoded("webp")),
            ("r.txt", b"t"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("y/3.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    items = list(tarball(path))
    assert [(i.key, i.fmt_ext, i.label) for i in items] == [
        ("x/1", "png", "x"),
        ("2", "webp", None),
    ]
    assert np.asarray(Image.open(io.BytesIO(items[0].encoded))).shape == (5, 6, 3)
    assert open_source(str(path)).name == "set"
