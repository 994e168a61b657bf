"""What a checkpoint holds, written at save and checked on resume: manifest.json in every checkpoint
folder records the kit's checkpoint format version and the size (and, by checkpoint.checksum, a
checksum) of every file the save wrote. Hashing is split over the ranks (each reads its own DCP
data files, from its page cache right after the save, and every world-th of the rest) and rank 0
gathers the records, so a save or a resume reads each byte once across the job.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
# The layout of what a checkpoint stores, bumped by any change a previous reader cannot load; a
# bump ships with its migration (checkpoints.MIGRATIONS). 1: optimizer param_groups by index
# (torch's default optimizer state dict; the kit before commit caee690). 2: optimizer state and
# param_groups keyed by parameter name (any parallel layout reads them), plus this manifest.
FORMAT_VERSION = 2
FORMATS = {1: "optimizer param_groups by index", 2: "optimizer state keyed by parameter name"}
_BLOCK = 16 << 20  # read size: large enough that the hash, not the system calls, sets the pace


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _blake2b(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


CHECKSUMS = {"crc32": _crc32, "blake2b": _blake2b}


def check_algorithm(name: str | None) -> None:
    if name not in (None, "none", *CHECKSUMS):
        raise ValueError(f"checkpoint.checksum={name!r}: expected one of none, {', '.join(CHECKSUMS)}")


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(share: dict) -> dict:
    """Every rank's share, merged, on every rank (tiny: names and numbers)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return share
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, share)
    return {k: v for s in shares for k, v in s.items()}


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # DCP's data file of rank N (FileSystemWriter's naming)


def _share(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's files: the data files it wrote itself (read back from its own page cache when
    hashed right after the save), the rest (metadata, other names) dealt round-robin."""
    mine, others = [], []
    for name in names:
        match = _RANK_FILE.fullmatch(name)
        if match:
            if int(match.group(1)) % world == rank:
                mine.append(name)
        else:
            others.append(name)
    return mine + others[rank::world]


def write(folder: Path, algorithm: str | None) -> dict:
    """All ranks, after every file of the checkpoint is written: size (+ checksum) of each file,
    gathered; rank 0 writes manifest.json. Returns the manifest."""
    rank, world = _world()
    algorithm = None if algorithm in (None, "none") else algorithm
    share = {}
    for name in _share(_files(folder), rank, world):
        path = folder / name
        share[name] = {"bytes": path.stat().st_size}
        if algorithm:
            share[name][algorithm] = CHECKSUMS[algorithm](path)
    manifest = {"format_version": FORMAT_VERSION, "checksum": algorithm, "files": dict(sorted(_gather(share).items()))}
    if rank == 0:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read(folder: Path) -> dict | None:
    """The manifest, or None for a checkpoint written before manifests (format 1 or early 2)."""
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def verify(folder: Path, use_checksums: bool) -> str | None:
    """All ranks: the first problem found (a file missing, cut short, grown or changed), the same
    on every rank, or None when the checkpoint is intact as far as its manifest records it.
    use_checksums=False checks sizes only (no read of the data)."""
    try:
        manifest = read(folder)
    except (OSError, ValueError) as e:
        return f"{folder / MANIFEST}: unreadable ({e})"
    if manifest is None:
        return None if (folder / ".metadata").exists() else f"{folder / '.metadata'}: missing"
    rank, world = _world()
    algorithm = manifest.get("checksum") if use_checksums else None
    problems = {}
    for name in _share(sorted(manifest["files"]), rank, world):
        path, want = folder / name, manifest["files"][name]
        if not path.is_file():
            problems[name] = f"{path}: missing"
        elif (size := path.stat().st_size) != want["bytes"]:
            problems[name] = f"{path}: {size} bytes, the save wrote {want['bytes']}"
        elif algorithm and (got := CHECKSUMS[algorithm](path)) != want[algorithm]:
            problems[name] = f"{path}: {algorithm} {got}, the save recorded {want[algorithm]}"
    problems = _gather(problems)
    return problems[min(problems)] if problems else None
