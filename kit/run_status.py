"""State of every stage under a runs folder: `make status` / `python launcher.py status`.

    python kit/run_status.py [--runs runs]

A stage's run dir (<runs>/<model>/<stage>/) says what it knows: DONE.json (finished, with its
summary), checkpoints/latest (how far it got), jobs.jsonl (what launcher.py started there). For a
Slurm job the state comes from scontrol (live and recently finished jobs) or sacct (older ones,
where the cluster keeps accounting). Not a Hydra stage: it trains nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


def slurm_state(job_id: str) -> str:
    """PENDING/RUNNING/COMPLETED/FAILED/... from scontrol (live and recently finished jobs),
    else sacct (older jobs, where accounting is configured), else UNKNOWN."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
        for field in out.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "UNKNOWN"


def wait_jobs(jobs: list[tuple[str, str]], poll_s: float = 3.0) -> int:
    """Wait until every job has finished; exit code 0 only if all COMPLETED."""
    last: dict[str, str] = {}
    while True:
        states = {jid: slurm_state(jid) for _, jid in jobs}
        for label, jid in jobs:
            if states[jid] != last.get(jid):
                print(f"[launcher] {label} ({jid}): {states[jid]}", flush=True)
        last = states
        if all(s in FINISHED for s in states.values()):
            return 0 if all(s == "COMPLETED" for s in states.values()) else 1
        time.sleep(poll_s)


def stage_state(run_dir: Path) -> dict:
    jobs = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()] \
        if (run_dir / "jobs.jsonl").exists() else []
    latest = run_dir / "checkpoints" / "latest"
    row = {"stage": f"{run_dir.parent.name}/{run_dir.name}", "job": jobs[-1].get("job_id", "local") if jobs else "-",
           "checkpoint": latest.read_text().strip() if latest.exists() else "-"}
    if (run_dir / "DONE.json").exists():
        done = json.loads((run_dir / "DONE.json").read_text())
        row["state"] = "DONE"
        row["detail"] = f"final_loss {done['final_loss']:.4f}" if "final_loss" in done else ""
    elif jobs:
        last = jobs[-1]
        row["state"] = slurm_state(last["job_id"]) if last["launcher"] == "slurm" else last.get("state", "UNKNOWN")
        row["detail"] = f"after {','.join(last['after'])}" if last.get("after") else ""
    else:
        row["state"], row["detail"] = ("STOPPED" if latest.exists() else "NOT STARTED"), ""
    return row


def status(runs: Path) -> list[dict]:
    def started(d: Path) -> float:  # chain order: when the stage was first launched
        first = d / "jobs.jsonl" if (d / "jobs.jsonl").exists() else d
        return first.stat().st_ctime if first.is_dir() else \
            datetime.datetime.fromisoformat(json.loads(first.read_text().splitlines()[0])["time"]).timestamp()
    dirs = {p.parent for pat in ("*/*/jobs.jsonl", "*/*/DONE.json", "*/*/checkpoints") for p in runs.glob(pat)}
    return [stage_state(d) for d in sorted(dirs, key=lambda d: (started(d), d.name))]


def print_status(runs: Path) -> None:
    rows = status(runs)
    print(f"{'STAGE':32} {'STATE':12} {'JOB':10} {'CHECKPOINT':22} DETAIL")
    for r in rows:
        print(f"{r['stage']:32} {r['state']:12} {r['job']:10} {r['checkpoint']:22} {r.get('detail', '')}")
    if not rows:
        print(f"(no stage has run under {runs}/)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="State of every stage under a runs folder")
    ap.add_argument("--runs", default="runs", type=Path)
    print_status(ap.parse_args().runs)
