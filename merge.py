"""Linear merge of two DCP checkpoints (paper 4.3, Eq. 1):

    theta = alpha * theta_reasoning + (1 - alpha) * theta_instruct

Streamed tensor by tensor so a 519B checkpoint merges on one host without a process group:
the output is planned from the inputs' DCP metadata alone (meta tensors), and DCP's file writer
asks a custom planner for each tensor's data only when it writes it; that callback loads the
tensor from each input (one dcp.load of one key), merges it and hands it over. Peak memory is
about two copies of the largest tensor plus a float32 row chunk, never the model.

What is merged (decided here, recorded in the manifest):
  * every floating-point "model" entry, including the MoE router bias `expert_bias_E`: the bias
    is learnt state that steers routing jointly with the router weights, and Eq. 1 interpolates
    the whole parameter vector; averaging it keeps the bias consistent with the averaged gate;
  * integer/bool "model" entries (counters, flags) cannot be interpolated: they are copied from
    the reasoning checkpoint (the alpha-dominant side) and the manifest lists them, with whether
    the two inputs disagreed;
  * optimizer state is not carried: the next stage (MOD SFT) starts a fresh optimizer.
The inputs must have the same keys, shapes and dtypes; anything else is refused with one line
naming the key. The output is written to `<out>.tmp` and renamed on success, so a failed merge
never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from kit.progress_bar import progress

PREFIX = "model."
ROW_CHUNK_ELEMS = 1 << 24  # float32 scratch per chunk: 64 MiB, whatever the tensor size

# DCP warns once per call that no process group exists; single-process I/O is the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class MergeError(ValueError):
    pass


def model_entries(ckpt: Path) -> dict[str, TensorStorageMetadata]:
    """{fqn: storage metadata} of the checkpoint's "model" entries (from .metadata only)."""
    if not (Path(ckpt) / ".metadata").exists():
        raise MergeError(f"{ckpt}: not a DCP checkpoint (no .metadata)")
    md = FileSystemReader(str(ckpt)).read_metadata()
    out = {}
    for key, meta in md.state_dict_metadata.items():
        if not key.startswith(PREFIX):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise MergeError(f"{ckpt}: model entry {key[len(PREFIX):]} is not a tensor; cannot merge it")
        out[key[len(PREFIX):]] = meta
    if not out:
        raise MergeError(f"{ckpt}: no 'model' entries in the checkpoint")
    return out


def check_compatible(reasoning: dict, instruct: dict) -> None:
    """One line naming the first key that differs in presence, shape or dtype."""
    only_r, only_i = sorted(set(reasoning) - set(instruct)), sorted(set(instruct) - set(reasoning))
    if only_r:
        raise MergeError(f"key {only_r[0]} is in the reasoning checkpoint but not the instruct one "
                         f"({len(only_r)} such keys): different architectures")
    if only_i:
        raise MergeError(f"key {only_i[0]} is in the instruct checkpoint but not the reasoning one "
                         f"({len(only_i)} such keys): different architectures")
    for k in sorted(reasoning):
        r, i = reasoning[k], instruct[k]
        if tuple(r.size) != tuple(i.size):
            raise MergeError(f"key {k}: shape {tuple(r.size)} (reasoning) != {tuple(i.size)} (instruct)")
        if r.properties.dtype != i.properties.dtype:
            raise MergeError(f"key {k}: dtype {r.properties.dtype} (reasoning) != {i.properties.dtype} (instruct)")


def load_tensor(ckpt: Path, fqn: str, meta: TensorStorageMetadata) -> torch.Tensor:
    """Read one full tensor from a (possibly sharded) DCP checkpoint, without a process group."""
    t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    dcp.load({"model": {fqn: t}}, storage_reader=FileSystemReader(str(ckpt)))
    return t


def merge_tensor(r: torch.Tensor, i: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * r + (1 - alpha) * i computed in (at least) float32, written into r chunk by chunk
    along dim 0 so the float32 scratch stays bounded for bf16 expert tensors (Eq. 1)."""
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    if r.ndim == 0:
        return (alpha * r.to(acc) + (1 - alpha) * i.to(acc)).to(r.dtype)
    rows = max(1, ROW_CHUNK_ELEMS // max(1, r[0].numel()))
    for s in range(0, r.shape[0], rows):
        r[s:s + rows] = (alpha * r[s:s + rows].to(acc) + (1 - alpha) * i[s:s + rows].to(acc)).to(r.dtype)
    return r


def file_hash(ckpt: Path) -> str:
    """sha256 over the checkpoint's files (names + bytes, sorted), streamed in 8 MiB blocks."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(ckpt).iterdir() if p.is_file() and (p.suffix == ".distcp" or p.name == ".metadata"))
    with progress(total=sum(f.stat().st_size for f in files), desc=f"[merge] sha256 {Path(ckpt).name}", unit="B",
                  scale=True) as bar:
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while block := fh.read(8 << 20):
                    h.update(block)
                    bar.update(len(block))
    return h.hexdigest()


class LazySavePlanner(DefaultSavePlanner):
    """Plans the output from meta tensors; produces each tensor's data only when DCP writes it
    (also hf_io.import_hf's writer)."""

    def __init__(self, produce):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        return self.produce(write_item.index.fqn[len(PREFIX):])


def merge_checkpoints(reasoning: Path, instruct: Path, out: Path, alpha: float, *, hash_inputs: bool = True,
                      on_tensor=None) -> dict:
    """Write the Eq. 1 merge of two DCP checkpoints to `out`; returns the manifest (also saved
    as `out/merge_manifest.json`). on_tensor(): called before each tensor (the run lease's heartbeat)."""
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"alpha={alpha}: expected a value in [0, 1] (paper 4.3 uses 0.8)")
    reasoning, instruct, out = Path(reasoning), Path(instruct), Path(out)
    meta_r, meta_i = model_entries(reasoning), model_entries(instruct)
    check_compatible(meta_r, meta_i)

    copied, disagreed = [], []
    bar = progress(total=sum(int(torch.Size(m.size).numel()) for m in meta_r.values()), desc="[merge] merge",
                   unit="param", scale=True)

    def produce(fqn: str) -> torch.Tensor:
        bar.update(int(torch.Size(meta_r[fqn].size).numel()))
        if on_tensor is not None:
            on_tensor()
        r = load_tensor(reasoning, fqn, meta_r[fqn])
        i = load_tensor(instruct, fqn, meta_i[fqn])
        if r.is_floating_point():
            return merge_tensor(r, i, alpha)
        copied.append(fqn)
        if not torch.equal(r, i):
            disagreed.append(fqn)
        return r

    t0 = time.perf_counter()
    plan = {"model": {k: torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta") for k, m in meta_r.items()}}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # thread_count=1 and no copy-ahead: DCP's serial loader resolves (= merges) one tensor at a time.
        dcp.save(plan, storage_writer=FileSystemWriter(str(tmp), thread_count=1, per_thread_copy_ahead=0),
                 planner=LazySavePlanner(produce))
        bar.close()
        manifest = {
            "formula": "theta = alpha * theta_reasoning + (1 - alpha) * theta_instruct (paper 4.3, Eq. 1)",
            "alpha": alpha,
            "reasoning": {"path": str(reasoning), "sha256": file_hash(reasoning) if hash_inputs else None},
            "instruct": {"path": str(instruct), "sha256": file_hash(instruct) if hash_inputs else None},
            "n_tensors": len(meta_r),
            "n_params": sum(int(torch.Size(m.size).numel()) for m in meta_r.values()),
            "copied_from_reasoning": sorted(copied),
            "copied_keys_that_differed": sorted(disagreed),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        manifest["output_sha256"] = file_hash(tmp)
        (tmp / "merge_manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / "train_state.json").write_text(json.dumps({"step": 0, "merged": True}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest
