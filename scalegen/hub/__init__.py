"""Releases: self-contained folders of safetensors weights, recipe, model card and checksums, and
loading them (from a folder or a URL) for fine-tuning and sampling."""

from scalegen.hub.checksums import SUMS, sha256_file, verify_folder
from scalegen.hub.load import cache_dir, fetch_release, init_from_release, load_release_model, merge_for_init
from scalegen.hub.release import make_release

__all__ = [
    "SUMS",
    "cache_dir",
    "fetch_release",
    "init_from_release",
    "load_release_model",
    "make_release",
    "merge_for_init",
    "sha256_file",
    "verify_folder",
]
