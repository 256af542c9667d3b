"""SHA-256 sums in the `sha256sum` format (`<hex>  <name>` per line), written and verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

from scalegen.errors import UserError

SUMS = "SHA256SUMS"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_sums(folder: Path, names: list[str]) -> Path:
    """SHA256SUMS for `names` (relative to `folder`); `sha256sum -c SHA256SUMS` checks it too."""
    lines = [f"{sha256_file(folder / n)}  {n}" for n in sorted(names)]
    path = folder / SUMS
    path.write_text("\n".join(lines) + "\n")
    return path


def read_sums(text: str, origin: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise UserError(f"{origin} line {i} is not '<sha256>  <file>': {line[:80]!r}")
        name = parts[1].lstrip("*").strip()
        if name.startswith("/") or ".." in Path(name).parts:
            raise UserError(f"{origin} names a file outside the release: {name!r}")
        sums[name] = parts[0].lower()
    if not sums:
        raise UserError(f"{origin} lists no files")
    return sums


def verify_folder(folder: Path) -> dict[str, str]:
    """Check every file listed in folder/SHA256SUMS; raise UserError naming the first that differs."""
    sums_path = folder / SUMS
    if not sums_path.is_file():
        raise UserError(f"{folder} has no {SUMS}: not a scalegen release (make one with `scalegen release`)")
    sums = read_sums(sums_path.read_text(), str(sums_path))
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"release {folder} is missing {name} (listed in {SUMS})")
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(
                f"checksum mismatch for {path}: expected {expected[:16]}..., got {actual[:16]}...; "
                "the file is corrupt or was modified: download the release again"
            )
    return sums
