"""Image feature extractors for FID/KID/IS, and their cached reference statistics.

Two kinds, never mixed up: the Inception network with the reference weights ("Inception FID") and a
classifier trained on the dataset ("domain FID (classifier trained on <dataset>)"). Each carries a
`preprocessing` checksum that, with the data checksum, keys its cached reference statistics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from scalegen.eval.dist import barrier, gather_rows, rank_world, shard_bounds
from scalegen.metrics.domain import load_or_train
from scalegen.metrics.fid import feature_statistics
from scalegen.metrics.inception import load_inception, preprocessing_id

# Grey image datasets up to this size also get a domain FID.
DOMAIN_MAX_SIZE = 64


@dataclass
class Extractor:
    key: str  # metric-name prefix: "" for Inception (fid, kid, is), "domain_" for the domain classifier
    label: str  # how reports name it
    net: nn.Module  # images -> (features [N, D], logits [N, C])
    preprocessing: str  # sha256 of everything that maps images to features (net weights included)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        device = next(self.net.parameters()).device
        f, logits = self.net(images.to(device))
        return f.float().cpu(), logits.float().cpu()


def inception_extractor(weights: str | None, device: torch.device) -> Extractor:

    net, sha = load_inception(weights, device)
    return Extractor(
        "",
        "Inception FID (InceptionV3, TF 2015-12-05 weights, 2048-d pool3)",
        net,
        preprocessing_id("fid-inception-v3", sha),
    )


def wants_domain(spec) -> bool:
    return spec.kind == "image" and spec.shape[0] == 1 and max(spec.shape[1:]) <= DOMAIN_MAX_SIZE


def domain_extractor(data, device: torch.device, train_split: str = "train", recipe=None) -> Extractor:
    """The dataset's own classifier: trained once (rank 0 first, the others then load the cache)."""

    x, y = data.split(train_split)
    rank, _ = rank_world()
    if rank != 0:
        barrier()
    net, key = load_or_train(data.name, x, y, max(2, data.spec.num_classes), recipe)
    if rank == 0:
        barrier()
    desc = json.dumps({"extractor": "domain-classifier", "key": key, "resize": "bilinear-28", "version": 1})
    return Extractor(
        "domain_",
        f"domain FID (classifier trained on {data.name})",
        net.to(device),
        hashlib.sha256(desc.encode()).hexdigest(),
    )


def features(extractor: Extractor, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Features and logits of all of x, split across ranks and gathered in order."""
    rank, world = rank_world()
    start, stop = shard_bounds(len(x), rank, world)
    fs, ls = [], []
    for i in range(start, stop, batch_size):
        f, logit = extractor(x[i : min(i + batch_size, stop)])
        fs.append(f)
        ls.append(logit)
    d = _out_dims(extractor, x)
    f = torch.cat(fs) if fs else torch.zeros(0, d[0])
    logit = torch.cat(ls) if ls else torch.zeros(0, d[1])
    return gather_rows(f), gather_rows(logit)


def _out_dims(extractor: Extractor, x: Tensor) -> tuple[int, int]:
    f, logit = extractor(x[:1])
    return f.shape[1], logit.shape[1]


def reference_statistics(
    extractor: Extractor, data, split: str, limit: int | None, batch_size: int, kid_examples: int, cache: Path
) -> dict:
    """mu, sigma, count (and a seeded subset of features for KID) of a data split, cached as .npz.

    The file name carries the dataset, split and a key over the data checksum, the shards' checksum
    and the preprocessing checksum, so a change to any of them computes new statistics.
    """

    x, _ = data.split(split, limit)
    data_sum = data.checksum(split, limit)
    shards_sum = data.shards_checksum.get(split, "")
    key = hashlib.sha256(f"{data_sum}/{shards_sum}/{extractor.preprocessing}".encode()).hexdigest()[:16]
    path = cache / f"{data.name}-{split}-{extractor.key or 'inception_'}{key}.npz"
    if path.is_file():
        z = np.load(path)
        return {k: z[k] for k in z.files} | {"path": str(path), "cached": True}
    feats, _ = features(extractor, x, batch_size)
    mu, sigma = feature_statistics(feats)
    gen = torch.Generator().manual_seed(0)
    subset = feats[torch.randperm(len(feats), generator=gen)[:kid_examples]].numpy()
    stats = {
        "mu": mu,
        "sigma": sigma,
        "count": np.int64(len(feats)),
        "kid_features": subset,
        "data_checksum": np.str_(data_sum),
        "shards_checksum": np.str_(shards_sum),
        "preprocessing_checksum": np.str_(extractor.preprocessing),
    }
    if rank_world()[0] == 0:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **stats)
        tmp.replace(path)
    return stats | {"path": str(path), "cached": False}
