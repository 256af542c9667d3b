"""The built-in datasets: digits, mnist, cifar10, fsdd. Each reads its upstream format and fixes the splits.

Split choices (also in docs/data.md and each manifest's `notes`):
- digits: scikit-learn's 1,797 images, permuted with numpy seed 0: train 1,347 / val 150 / test 300.
- mnist: upstream train's first 55,000 = train, its last 5,000 = val, upstream t10k = test.
- cifar10: data_batch_1..5 = train (50,000), test_batch = test (10,000); no val (loaders fall back to test).
- fsdd: the official split: takes 0-4 of every speaker and digit = test (300), takes 5-49 = train (2,700).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scalegen.data.decode import encode_png
from scalegen.data.prepare import Prepared, preparer

DIGIT_NAMES = [str(i) for i in range(10)]


@preparer("digits")
def digits(source: str | None) -> Prepared:
    """scikit-learn's 8x8 digits (embedded in the package: no download). 17 grey levels mapped to 0..255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    # 0..16 -> 0..255 with round(v * 255 / 16): 0 stays 0, 16 becomes 255, levels stay equally spaced.
    images = np.round(data.images * 255.0 / 16.0).astype(np.uint8)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    cut = {"test": order[:300], "val": order[300:450], "train": order[450:]}
    splits = {name: [(int(i), images[i], int(labels[i])) for i in sorted(idx)] for name, idx in cut.items()}
    raw = data.images.astype(np.float64).tobytes() + labels.tobytes()
    import hashlib

    return Prepared(
        kind="image", shape=[1, 8, 8], class_names=DIGIT_NAMES,
        splits={k: splits[k] for k in ("train", "val", "test")},
        encode=_encode_image("digits"),
        source={"name": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
                "sha256": hashlib.sha256(raw).hexdigest(), "sha256_of": "float64 images then int64 labels"},
        notes="permutation of the 1,797 images by numpy default_rng(0): first 300 = test, next 150 = val, "
              "rest (1,347) = train; grey levels 0..16 stored as round(v*255/16)",
        fields={"png": "image, greyscale 8x8", "cls": "digit 0-9 (key: digits-{index in load_digits()})"},
        shard_size=500,
    )


def _encode_image(prefix: str) -> Any:
    def encode(split: str, i: int, item: tuple[int, np.ndarray, int]) -> dict[str, Any]:
        index, img, label = item
        return {"__key__": f"{prefix}-{index:06d}", "png": encode_png(img), "cls": str(label).encode()}

    return encode
