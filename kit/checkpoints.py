"""DCP checkpoints of the training stages: directories written beside, then renamed; `latest`
names the newest. Model and optimizer state are saved under the whole model's parameter names, so
a checkpoint from one layout (FSDP x EP, PP, CP) resumes on any other; a resume prints what changed.
Each checkpoint records its format version and the size and checksum of its files
(checkpoint_manifest.py); a resume verifies them and falls back to the newest intact checkpoint,
and migrates a checkpoint of an older format (MIGRATIONS) as it loads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from kit import checkpoint_manifest
from kit import config_checks

_STEP_DIR = re.compile(r"step-\d+")  # a finished checkpoint (not .tmp, not set aside as .damaged)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a kill mid-write never leaves a half file (a
    `latest` pointer to nowhere, a DONE.json that reads as done)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ptr = ckpt_root(run_dir) / "latest"
    if not ptr.exists():
        return None
    path = ckpt_root(run_dir) / ptr.read_text().strip()
    return path if (path / ".metadata").exists() else None


def _parts(net) -> list[torch.nn.Module]:
    return list(net) if isinstance(net, (list, tuple)) else [net]


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # keys by parameter name: any layout reads them


def _train_state_dicts(net, opt) -> tuple[dict, dict, list]:
    """Model and optimizer state of every chunk, merged under the whole model's names (a
    pipeline chunk keeps its modules' names, so any layout saves and loads the same keys)."""
    model_sd, optim_sd, per_part = {}, {}, []
    for part, o in zip(_parts(net), _parts(opt)):
        m, s = get_state_dict(part, o, options=_FLAT)
        model_sd.update(m)
        optim_sd.update(s)
        per_part.append((list(m), list(s)))
    return model_sd, optim_sd, per_part


def check_embedding_copy(pipe, stage_name: str) -> None:
    """Before a checkpoint (it stores one embedding): the MTP embedding copy on the last stage
    must equal the first stage's, else the run stops rather than save either."""
    if pipe is None or pipe.emb_group is None:
        return
    drift = pipe.embedding_drift()
    if drift != 0.0:
        raise RuntimeError(f"[{stage_name}] the last stage's MTP embedding copy drifted from the first stage's "
                           f"embedding (max |diff| {drift:.3g}); not saving a checkpoint")
    if dist.get_rank() == 0:
        print(f"[{stage_name}] MTP embedding copy equals the first stage's (max |diff| 0)", flush=True)


def layout_of(cfg: DictConfig, world_size: int) -> dict:
    """What a checkpoint records about the run that wrote it (compared on resume)."""
    b, d = config_checks.budget(cfg), config_checks.mesh_degrees(cfg, world_size)
    return {"world": world_size, "dp": d["dp"], "pp": d["pp"], "ep": d["ep"], "cp": d["cp"],
            "pp_stages_per_rank": cfg.parallelism.pp_stages_per_rank,
            "batch_schedule": [b.batch_start, b.batch_end, b.batch_increment, b.ramp_samples]}


def resume_changes(saved: dict, now: dict, step: int) -> list[str]:
    """Lines saying how the resumed run differs from the one that wrote the checkpoint (paper
    3.4: the cluster grew from 1,024 to 1,536 GPUs and the batch from 16,384 to 18,432)."""
    out = []
    if saved and {k: v for k, v in saved.items() if k != "batch_schedule"} != \
            {k: v for k, v in now.items() if k != "batch_schedule"}:
        fmt = "world {world} (dp {dp} x pp {pp} x cp {cp}, ep {ep})"
        out.append(f"layout changed at step {step}: {fmt.format(**saved)} -> {fmt.format(**now)}; "
                   f"DCP resharded weights and optimizer state, the loader continues at its global sample")
    if saved and saved.get("batch_schedule") != now["batch_schedule"]:
        out.append(f"batch schedule changed at step {step}: [start, end, increment, ramp samples] "
                   f"{saved.get('batch_schedule')} -> {now['batch_schedule']}")
    return out


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def save_checkpoint(run_dir, step: int, net, opt, train_state: dict, keep_last: int,
                    checksum: str | None = "crc32") -> Path:
    """All ranks write into step-N.tmp; rank 0 renames it and then moves `latest`, so a crash
    mid-write leaves the previous checkpoint (and the pointer to it) untouched. `net`/`opt` may be
    lists (pipeline chunks and their optimizers). Before the rename every rank sizes (and, with
    `checksum`, hashes) its share of the files for manifest.json."""
    root = ckpt_root(run_dir)
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd, _ = _train_state_dicts(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps(train_state))
    dist.barrier()
    checkpoint_manifest.write(tmp, checksum)  # gathers every rank's share: also a barrier
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(root / "latest", final.name)
        steps = _step_dirs(root)
        for old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _model_state_dict(net) -> tuple[dict, list]:
    sd, per_part = {}, []
    for part in _parts(net):
        m = get_model_state_dict(part)
        sd.update(m)
        per_part.append(list(m))
    return sd, per_part


def save_model_weights(path: Path, net) -> None:
    """Weights and buffers only (no optimizer), e.g. a run's seeded starting point for init_from.
    (Asking DCP for an empty optimizer's state would run a zero-LR step to create it.)"""
    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": _model_state_dict(net)[0]}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path: Path, net, opt) -> dict:
    """Resume: weights, optimizer and train state, from a checkpoint of any layout (DCP
    reshards by name) written in the current format (resume() migrates older ones)."""
    model_sd, optim_sd, per_part = _train_state_dicts(net, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    _set_train_state(net, opt, per_part, state["model"], state["optim"])
    return json.loads((path / "train_state.json").read_text())


def _set_train_state(net, opt, per_part, model_sd: dict, optim_sd: dict) -> None:
    for part, o, (mkeys, okeys) in zip(_parts(net), _parts(opt), per_part):
        set_state_dict(part, o, model_state_dict={k: model_sd[k] for k in mkeys},
                       optim_state_dict={k: optim_sd[k] for k in okeys}, options=_FLAT)


def load_model_weights(path: Path, net) -> None:
    """Initialise from another stage's checkpoint: weights and buffers only (fresh optimizer)."""
    sd, per_part = _model_state_dict(net)
    dcp.load({"model": sd}, checkpoint_id=str(path))
    for part, keys in zip(_parts(net), per_part):
        set_model_state_dict(part, {k: sd[k] for k in keys}, options=StateDictOptions(strict=True))


def resolve_init(cfg: DictConfig) -> Path | None:
    """`stage.init_from` is a previous stage's name (its latest checkpoint) or a path."""
    src = cfg.stage.get("init_from")
    if not src:
        return None
    p = Path(src)
    if not p.exists():
        run = Path(cfg.paths.runs) / cfg.model.name / src
        p = latest_checkpoint(run)
        if p is None or not (run / "DONE.json").exists():
            raise FileNotFoundError(f"stage/{cfg.stage.name}.yaml init_from={src}: no finished run at {run} "
                                    f"(run stage {src} first)")
    return p


# ----------------------------------------------------------------------------------------
# Checkpoint formats: the version a checkpoint was written in, and how older ones load.
# ----------------------------------------------------------------------------------------
class CheckpointFormatError(SystemExit):
    """A checkpoint this kit cannot read: one line naming both format versions."""


def checkpoint_format(path: Path) -> int:
    """The format version of a checkpoint: its manifest's, else told by its keys (checkpoints
    written before manifests: param_groups by index is format 1, by name format 2)."""
    manifest = checkpoint_manifest.read(path)
    if manifest is not None:
        return int(manifest["format_version"])
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return 1 if any(k.startswith("optim.param_groups.0.") for k in keys) else 2


def _load_format_1(path: Path, net, opt) -> dict:
    """Format 1 -> 2: the tensors of the optimizer state (optim.state.<name>.<field>) have the same
    keys in both; only param_groups moved from a list (optim.param_groups.<i>.<field>, with the
    group's parameter names in .params) to one entry per parameter name. Reads the tensors by
    name, the groups by index, and hands each parameter its group's fields."""
    model_sd, optim_sd, per_part = _train_state_dicts(net, opt)
    tensors = {k: v for k, v in optim_sd.items() if k.startswith("state.")}
    dcp.load({"model": model_sd, "optim": tensors}, checkpoint_id=str(path))
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    fields: dict[int, dict] = {}
    for key in keys:
        if key.startswith("optim.param_groups."):
            index, field = key[len("optim.param_groups."):].split(".", 1)
            fields.setdefault(int(index), {})[field] = None
    groups = {"param_groups": [fields[i] for i in sorted(fields)]}
    dcp.load({"optim": groups}, checkpoint_id=str(path))  # small values, read on every rank
    group_of = {name: group for group in groups["param_groups"] for name in group["params"]}
    for key in optim_sd:
        if key.startswith("param_groups."):
            name, field = key[len("param_groups."):].rsplit(".", 1)
            optim_sd[key] = group_of[name].get(field, optim_sd[key])
        else:
            optim_sd[key] = tensors[key]
    _set_train_state(net, opt, per_part, model_sd, optim_sd)
    return json.loads((path / "train_state.json").read_text())


# format version -> the loader that reads it into the current in-memory state; a format change
# adds its predecessor here (checkpoint_manifest.FORMAT_VERSION).
MIGRATIONS = {1: _load_format_1}


def _load_any_format(path: Path, net, opt, stage_name: str) -> dict:
    version, now = checkpoint_format(path), checkpoint_manifest.FORMAT_VERSION
    if version == now:
        return load_checkpoint(path, net, opt)
    if version not in MIGRATIONS:
        raise CheckpointFormatError(1 if dist.get_rank() else
            f"[{stage_name}] {path}: checkpoint format {version}, this kit reads formats "
            f"{sorted([*MIGRATIONS, now])} and writes {now}: resume it with the kit that wrote it, or add its "
            f"migration to kit/checkpoints.py MIGRATIONS (see README 'Run safety')")
    state = MIGRATIONS[version](path, net, opt)
    if dist.get_rank() == 0:
        print(f"[{stage_name}] {path.name} is checkpoint format {version} ({checkpoint_manifest.FORMATS[version]}); "
              f"migrated to format {now} ({checkpoint_manifest.FORMATS[now]}) as it loaded; the next checkpoint "
              f"is written in format {now}", flush=True)
    return state


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def resume(run_dir, net, opt, stage_name: str, checksum: str | None) -> tuple[Path | None, dict | None]:
    """All ranks: load the newest intact checkpoint of run_dir; (None, None) when it has none.
    Newest first from the one `latest` names: a checkpoint whose manifest disagrees with its files
    (size always, checksum when `checksum` is set) or that fails to load is reported in one line
    naming the file and set aside as step-N.damaged once an older one has loaded; none intact stops
    the stage in one line (nothing is set aside then)."""
    checkpoint_manifest.check_algorithm(checksum)
    root = ckpt_root(run_dir)
    latest = latest_checkpoint(run_dir)
    steps = [p for p in reversed(_step_dirs(root)) if latest is None or p.name <= latest.name]
    damaged = []
    for path in steps:
        problem = checkpoint_manifest.verify(path, use_checksums=checksum not in (None, "none"))
        state = None
        if problem is None:
            try:
                state = _load_any_format(path, net, opt, stage_name)
            except CheckpointFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - DCP raises its read errors on every rank
                problem = f"{path}: does not load ({_one_line(e)})"
        if state is not None:
            if dist.get_rank() == 0:
                for bad in damaged:
                    os.replace(bad, bad.with_name(bad.name + ".damaged"))
            dist.barrier()
            return path, state
        damaged.append(path)
        if dist.get_rank() == 0:
            print(f"[{stage_name}] checkpoint {path.name} is damaged: {problem}; trying the one before it", flush=True)
    if damaged:  # rank 0 says it; the other ranks stop quietly beside it
        raise SystemExit(1 if dist.get_rank() else f"[{stage_name}] no intact checkpoint in {root} ({', '.join(p.name for p in damaged)} "
                         f"all damaged, see the lines above); not starting over on top of them: move them aside "
                         f"to start from scratch")
    return None, None
