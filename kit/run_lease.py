"""One writer per run folder: a training stage holds <run_dir>/LEASE.json while it runs.

The lease names its holder (host, pid, Slurm job id and restart count, stage) and carries a
heartbeat the training loop refreshes. A second process on a held folder stops in one line naming
the holder and writes nothing; a lease whose holder is gone is taken over with one line saying why:
  - the same Slurm job, requeued (a higher SLURM_RESTART_COUNT): the job re-running takes its own lease;
  - the holder's pid is dead on this host (a kill -9, a crash);
  - the holder's Slurm job has ended (squeue/sacct, where they answer): a node failure, a cancel;
  - the heartbeat is older than lease.stale_after_s (a holder on a host we cannot ask).
Rank 0 decides and broadcasts, so every rank of a refused stage stops together. Evaluation and
report stages only read a run folder and take no lease.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from kit import run_status

LEASE_FILE = "LEASE.json"
# Slurm states after which a job's processes are gone (JobState / sacct State, first word).
SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


class LeaseHeld(SystemExit):
    """Another live process holds the run folder: the one line a refused stage ends with."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/<pid>/stat field 22): a pid reused by another
    process after the holder died has a different one. None where /proc has no such pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    if pid <= 0:  # not a process (os.kill would address a process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def holder_record(stage: str) -> dict:
    """Who this process is, as the lease records it."""
    pid = os.getpid()
    return {"stage": stage, "host": socket.gethostname(), "pid": pid, "pid_start": _proc_start(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "token": uuid.uuid4().hex, "started": time.time(), "heartbeat": time.time()}


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']} (restart {holder.get('slurm_restart', 0)})" if holder.get("slurm_job") else ""
    return f"{holder.get('stage', '?')} pid {holder.get('pid')} on {holder.get('host')}{job}"


def stale_reason(holder: dict, me: dict, stale_after_s: float, now: float | None = None) -> str | None:
    """Why the holder is gone (a takeover line), or None while it may still be writing."""
    now = time.time() if now is None else now
    if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"] \
            and me["slurm_restart"] > int(holder.get("slurm_restart", 0)):
        return f"Slurm requeued job {me['slurm_job']} (restart {holder.get('slurm_restart', 0)} -> {me['slurm_restart']})"
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"] and holder.get("pid_start") == me["pid_start"]:
        return "it was this process's own earlier run (in-process stage.run calls)"
    if holder.get("host") == me["host"] and not _pid_alive(int(holder["pid"]), holder.get("pid_start")):
        return f"pid {holder['pid']} is no longer running on {me['host']}"
    if holder.get("slurm_job") and holder.get("slurm_job") != me["slurm_job"]:
        state = run_status.slurm_state(str(holder["slurm_job"])).split()[0]
        if state.rstrip("+") in SLURM_ENDED:
            return f"its Slurm job {holder['slurm_job']} is {state}"
    age = now - float(holder.get("heartbeat", 0))
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old (lease.stale_after_s={stale_after_s:g})"
    return None


class RunLease:
    """The lease this process holds (rank 0 of a stage); heartbeat() from the loop, release() at the end."""

    def __init__(self, path: Path, record: dict, heartbeat_s: float):
        self.path, self.record, self.heartbeat_s = path, record, heartbeat_s
        self._last = record["heartbeat"]

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the heartbeat (at most every heartbeat_s). A lease that now names someone else
        was taken over (we were judged gone): stop rather than write beside the new holder."""
        now = time.time()
        if not force and now - self._last < self.heartbeat_s:
            return
        current = read_lease(self.path)
        if current is not None and current.get("token") != self.record["token"]:
            raise LeaseHeld(f"{self.path}: this run folder was taken over by {describe(current)} "
                            f"while this process ({describe(self.record)}) held it; stopping without writing")
        self.record["heartbeat"] = self._last = now
        _write(self.path, self.record)

    def release(self) -> None:
        current = read_lease(self.path)
        if current is not None and current.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


class NoLease:
    """What ranks other than 0 hold: rank 0 speaks for the stage."""

    def heartbeat(self, force: bool = False) -> None:
        pass

    def release(self) -> None:
        pass


def read_lease(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a half-written lease (the writer died mid-write): no live owner wrote it last
        return {"stage": "?", "host": "?", "pid": -1, "heartbeat": 0.0}


def _write(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.{record['token']}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _create(path: Path, record: dict) -> bool:
    """Create the lease only if there is none, whole: written beside, then hard-linked into place
    (link fails if the name exists, so of two processes racing one wins, and no reader ever sees
    a half-written lease)."""
    tmp = path.with_name(f"{path.name}.{record['token']}.new")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def acquire(run_dir: Path, lease_cfg: DictConfig, stage: str) -> tuple[RunLease | None, str]:
    """Take the lease on run_dir (this process only). Returns (lease, line to print) or
    (None, refusal line)."""
    path = Path(run_dir) / LEASE_FILE
    me = holder_record(stage)
    for _ in range(3):  # a lost race against another taker: look again
        holder = read_lease(path)
        if holder is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if _create(path, me):
                return RunLease(path, me, lease_cfg.heartbeat_s), ""
            continue
        reason = stale_reason(holder, me, float(lease_cfg.stale_after_s))
        if reason is None:
            age = time.time() - float(holder.get("heartbeat", 0))
            return None, (f"[{stage}] {run_dir} is held by {describe(holder)}, heartbeat {age:.0f} s ago "
                          f"({path}); one writer per run folder: wait for it or stop it (if it is gone for "
                          f"good, delete {path.name})")
        # Move the stale lease aside under a name of our own: of two takers only one rename succeeds.
        aside = path.with_name(f"{path.name}.stale.{me['token']}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        aside.unlink(missing_ok=True)
        if _create(path, me):
            return RunLease(path, me, lease_cfg.heartbeat_s), (
                f"[{stage}] took over the lease on {run_dir} from {describe(holder)}: {reason}")
    return None, f"[{stage}] {path}: another process keeps taking this lease; one writer per run folder"


def take(run_dir: Path, lease_cfg: DictConfig, stage: str) -> RunLease | NoLease:
    """Every rank calls this first thing: rank 0 takes the lease, all ranks learn the verdict; a
    refused stage stops on every rank (rank 0 prints the one line) before touching run_dir.
    Returns the lease on rank 0, a NoLease elsewhere."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    lease, line = acquire(Path(run_dir), lease_cfg, stage) if rank == 0 else (None, "")
    verdict = [lease is not None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if not verdict[0]:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise LeaseHeld(line if rank == 0 else 1)
    if line:
        print(line, flush=True)
    return lease if lease is not None else NoLease()
