"""The built-in datasets: digits, mnist, cifar10, fsdd. Each reads its upstream format and fixes the splits.

Split choices (also in docs/data.md and each manifest's `notes`):
- digits: scikit-learn's 1,797 images, permuted with numpy seed 0: train 1,347 / val 150 / test 300.
- mnist: upstream train's first 55,000 = train, its last 5,000 = val, upstream t10k = test.
- cifar10: data_batch_1..5 = train (50,000), test_batch = test (10,000); no val (loaders fall back to test).
- fsdd: the official split: takes 0-4 of every speaker and digit = test (300), takes 5-49 = train (2,700).

Downloads are checked against sha256 digests of what matters: the decompressed MNIST IDX files (the
.gz headers carry a timestamp, so mirrors differ there), the CIFAR-10 archive, and the FSDD
recordings (the digest of their `sha256sum` listing, since GitHub's zip archives are not byte-stable).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from scalegen.data.decode import encode_npy
from scalegen.data.download import cache_dir, fetch
from scalegen.data.manifest import DataError
from scalegen.data.prepare import Prepared, preparer

DIGIT_NAMES = [str(i) for i in range(10)]


@preparer("digits")
def digits(source: str | None) -> Prepared:
    """scikit-learn's 8x8 digits (embedded in the package: no download). 17 grey levels mapped to 0..255."""
    from sklearn.datasets import load_digits  # heavy: only to prepare the digits

    data = load_digits()
    # 0..16 -> 0..255 with round(v * 255 / 16): 0 stays 0, 16 becomes 255, levels stay equally spaced.
    images = np.round(data.images * 255.0 / 16.0).astype(np.uint8)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    cut = {"test": order[:300], "val": order[300:450], "train": order[450:]}
    splits = {name: [(f"digits-{i:06d}", images[i], int(labels[i])) for i in sorted(idx)] for name, idx in cut.items()}
    raw = data.images.astype(np.float64).tobytes() + labels.tobytes()
    return Prepared(
        kind="image",
        shape=[1, 8, 8],
        class_names=DIGIT_NAMES,
        splits={k: splits[k] for k in ("train", "val", "test")},
        encode=_encode_image,
        source={
            "name": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
            "sha256": hashlib.sha256(raw).hexdigest(),
            "sha256_of": "float64 images then int64 labels",
        },
        notes="permutation of the 1,797 images by numpy default_rng(0): first 300 = test, next 150 = val, "
        "rest (1,347) = train; grey levels 0..16 stored as round(v*255/16)",
        fields={"npy": "image, uint8 [1, 8, 8]", "cls": "digit 0-9 (key: digits-{index in load_digits()})"},
        shard_size=500,
    )


def _encode_image(split: str, i: int, item: tuple[str, np.ndarray, int]) -> dict[str, Any]:
    """Pixels as a raw uint8 [C, H, W] `.npy` (standard WebDataset; decoded by a copy, checked by `crc32`)."""
    key, img, label = item
    chw = img[None] if img.ndim == 2 else img
    return {"__key__": key, "npy": encode_npy(chw), "cls": str(label).encode()}


# ---- MNIST -------------------------------------------------------------------------------------------
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
MNIST_SHA256 = {  # of the decompressed IDX files (the widely published digests)
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def _mnist_file(folder: Path | None, name: str) -> bytes:
    """A decompressed IDX file, from `folder` (.gz or plain) or downloaded; its sha256 must match."""
    if folder is None:
        path = fetch([m + name + ".gz" for m in MNIST_MIRRORS], cache_dir("mnist") / (name + ".gz"))
    else:
        path = next((p for p in (folder / (name + ".gz"), folder / name) if p.is_file()), None)
        if path is None:
            raise DataError(
                f"{folder} has no {name}.gz (or {name}): --source must be the folder with the four MNIST IDX files"
            )
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_SHA256[name]:
        raise DataError(
            f"{path}: decompressed sha256 {digest} is not the official {MNIST_SHA256[name]}; "
            "the file is corrupt or not MNIST (delete it to download again)"
        )
    return data


@preparer("mnist")
def mnist(source: str | None) -> Prepared:
    """MNIST from the four IDX files; the val split is the last 5,000 of upstream train."""
    folder = Path(source).expanduser() if source else None
    arrays = {}
    for part in ("train", "t10k"):
        images = _mnist_file(folder, f"{part}-images-idx3-ubyte")
        labels = _mnist_file(folder, f"{part}-labels-idx1-ubyte")
        x = np.frombuffer(images, np.uint8, offset=16).reshape(-1, 28, 28)
        y = np.frombuffer(labels, np.uint8, offset=8).astype(np.int64)
        arrays[part] = [(f"mnist-{part}-{i:05d}", x[i], int(y[i])) for i in range(len(y))]
    return Prepared(
        kind="image",
        shape=[1, 28, 28],
        class_names=DIGIT_NAMES,
        splits={"train": arrays["train"][:55000], "val": arrays["train"][55000:], "test": arrays["t10k"]},
        encode=_encode_image,
        source={
            "name": "MNIST (LeCun, Cortes, Burges)",
            "url": MNIST_MIRRORS[0],
            "local": str(folder) if folder else None,
            "sha256": MNIST_SHA256,
            "sha256_of": "decompressed IDX files",
        },
        notes="train = upstream train 0..54999, val = upstream train 55000..59999, test = upstream t10k; "
        "keys mnist-{train|t10k}-{upstream index}",
        fields={"npy": "image, uint8 [1, 28, 28]", "cls": "digit 0-9"},
        shard_size=5000,
    )


# ---- CIFAR-10 ----------------------------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"  # 170,498,071 bytes


def _unpickle(data: bytes) -> dict[str, Any]:
    # The upstream batches were pickled by Python 2: keys and strings are bytes.
    d = pickle.loads(data, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_members(source: str | None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """{file name: bytes} of the python batches, from the archive (downloaded or given) or a folder."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    path = Path(source).expanduser() if source else None
    if path is None or path.is_file():
        verify = path is None
        archive = (
            fetch([CIFAR10_URL], cache_dir("cifar10") / "cifar-10-python.tar.gz", CIFAR10_SHA256)
            if path is None
            else path
        )
        members = {}
        with tarfile.open(archive, "r:*") as tar:
            for m in tar.getmembers():
                if m.isfile() and Path(m.name).name in names:
                    members[Path(m.name).name] = tar.extractfile(m).read()  # type: ignore[union-attr]
        info = {
            "archive": str(archive),
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            "sha256_of": "cifar-10-python.tar.gz",
        }
        if verify or info["sha256"] == CIFAR10_SHA256:
            info["verified"] = True
    else:
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        members = {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}
        digest = hashlib.sha256(b"".join(hashlib.sha256(members[n]).digest() for n in sorted(members)))
        info = {
            "folder": str(folder),
            "sha256": digest.hexdigest(),
            "sha256_of": "sha256 of the concatenated sha256 digests of the batch files, sorted by name",
        }
    missing = [n for n in names if n not in members]
    if missing:
        raise DataError(
            f"CIFAR-10 source {path} lacks {', '.join(missing)}: --source must be "
            "cifar-10-python.tar.gz or the cifar-10-batches-py folder"
        )
    return members, info


@preparer("cifar10")
def cifar10(source: str | None) -> Prepared:
    """CIFAR-10 from the python-pickle batches (upstream format)."""
    members, info = _cifar_members(source)
    meta = _unpickle(members["batches.meta"])
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    splits: dict[str, list[Any]] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = _unpickle(members[name])
        x = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], np.int64)
        split = "test" if name == "test_batch" else "train"
        splits[split] += [(f"cifar10-{name}-{i:05d}", x[i], int(y[i])) for i in range(len(y))]
    return Prepared(
        kind="image",
        shape=[3, 32, 32],
        class_names=class_names,
        splits=splits,
        encode=_encode_image,
        source={"name": "CIFAR-10 (Krizhevsky 2009)", "url": CIFAR10_URL, **info},
        notes="train = data_batch_1..5, test = test_batch, no val split (loaders use test); "
        "keys cifar10-{batch file}-{row}",
        fields={"npy": "image, uint8 [3, 32, 32]", "cls": "class index into class_names"},
        shard_size=5000,
    )


# ---- FSDD --------------------------------------------------------------------------------------------
FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_URL = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.zip"
FSDD_SHA256SUMS = "1801eae019c063377d98f831d3f93574f259475df7332bb0e3d1b080fb5e6959"  # of the listing
FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
_FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def _fsdd_recordings(source: str | None) -> tuple[dict[str, bytes], dict[str, Any]]:
    if source is None:

        archive = fetch([FSDD_URL], cache_dir("fsdd") / f"fsdd-{FSDD_COMMIT[:7]}.zip")
        with zipfile.ZipFile(archive) as z:
            files = {Path(n).name: z.read(n) for n in z.namelist() if "/recordings/" in n and n.endswith(".wav")}
        where = {"url": FSDD_URL}
    else:
        path = Path(source).expanduser()
        folder = path / "recordings" if (path / "recordings").is_dir() else path
        files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.wav"))}
        where = {"local": str(folder)}
    if not files:
        raise DataError(f"no FSDD recordings (*.wav) found in {source or FSDD_URL}")
    listing = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    digest = hashlib.sha256(listing.encode()).hexdigest()
    if digest != FSDD_SHA256SUMS:
        raise DataError(
            f"FSDD recordings in {source or FSDD_URL} do not match release {FSDD_COMMIT[:7]} "
            f"(digest of their sha256sum listing {digest}, expected {FSDD_SHA256SUMS}); "
            "point --source at an unmodified copy of recordings/"
        )
    return files, {
        **where,
        "sha256": digest,
        "sha256_of": "`sha256sum *.wav` listing of recordings/ (sorted)",
    }


@preparer("fsdd")
def fsdd(source: str | None) -> Prepared:
    """Free Spoken Digit Dataset: 8 kHz mono WAVs stored unchanged; label = digit, json speaker/take."""
    files, info = _fsdd_recordings(source)
    splits: dict[str, list[Any]] = {"train": [], "test": []}
    for name in sorted(files):
        m = _FSDD_NAME.match(name)
        if m is None or m.group(2) not in FSDD_SPEAKERS:
            raise DataError(f"unexpected FSDD file name {name!r} (digit_speaker_take.wav)")
        digit, speaker, take = int(m.group(1)), m.group(2), int(m.group(3))
        splits["test" if take <= 4 else "train"].append((name[:-4], files[name], digit, speaker, take))
    return Prepared(
        kind="audio",
        shape=[1, 0],
        class_names=DIGIT_NAMES,
        splits=splits,
        encode=_encode_fsdd,
        source={"name": "Free Spoken Digit Dataset (Jakobovski et al.)", "commit": FSDD_COMMIT, **info},
        notes="official split: takes 0-4 of each speaker and digit = test (300), takes 5-49 = train (2,700); "
        "keys {digit}_{speaker}_{take}",
        fields={
            "wav": "8 kHz mono 16-bit PCM, as upstream",
            "cls": "spoken digit 0-9",
            "json": "speaker (index into extra_classes.speaker), take (0-49)",
        },
        sample_rate=8000,
        levels=65536,
        extra_classes={"speaker": FSDD_SPEAKERS},
        shard_size=500,
    )


def _encode_fsdd(split: str, i: int, item: tuple[str, bytes, int, str, int]) -> dict[str, Any]:
    key, wav, digit, speaker, take = item
    meta = {"speaker": FSDD_SPEAKERS.index(speaker), "take": take}
    return {"__key__": key, "wav": wav, "cls": str(digit).encode(), "json": json.dumps(meta).encode()}
