"""The curation chain as datatrove Slurm job arrays on the local cluster (scripts/slurm_local.sh up):
killed while a job runs, re-run with data.resume=true, it finishes with the same shards as the
uninterrupted local run. Skipped when no cluster answers."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, child_env, cluster_up

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STAGES = ("pretrain_s1", "pretrain_s2", "pretrain_s3")
SLURM = ["data.executor.kind=slurm", "data.executor.tasks=2"]  # conf/data/tiny.yaml: the local cluster's partition
TIMEOUT = 420


def curate(out: Path, *overrides: str) -> str:
    """stages/curate.py's console and what datatrove printed during this run (its console.log)."""
    log = out / "_work" / "logs" / "console.log"
    seen = log.read_text() if log.exists() and "data.resume=true" in overrides else ""
    p = subprocess.run([sys.executable, "stages/curate.py", f"data.root={out}", f"data.work_dir={out}/_work",
                        f"hydra.run.dir={out}/hydra", *overrides], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    text = p.stdout + p.stderr + (log.read_text()[len(seen):] if log.exists() else "")
    if "data.executor.kind=slurm" in overrides:  # returns once submitted, saying so
        assert "datatrove jobs submitted" in text, text[-3000:]
    else:
        assert p.returncode == 0, text[-3000:]
    return text


def wait_for(predicate, what: str):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < TIMEOUT, f"timed out waiting for {what}"
        time.sleep(0.5)


def running(name: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-n", name, "-t", "R", "-o", "%i"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def queued(ids: list[str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def shard_hashes(out: Path) -> dict:
    import json

    return {s: [x["sha256"] for x in json.loads((out / s / "manifest.json").read_text())["shards"]] for s in STAGES}


@pytest.mark.skipif(not cluster_up(), reason="no Slurm cluster answers (scripts/slurm_local.sh up)")
def test_killed_slurm_curation_resumes_to_the_uninterrupted_output(tmp_path, tiny_data):
    ref, out = tmp_path / "local", tmp_path / "slurm"
    curate(ref, "data.executor.tasks=2", "data.executor.workers=2")
    text = curate(out, *SLURM)
    ids = re.findall(r"launched successfully with \(last\) id=(\d+)", text)
    assert len(ids) == 11, text[-2000:]  # one job array per step
    wait_for(lambda: running("axk1-tokenize"), "the tokenize job to start")
    subprocess.run(["scancel", *ids], check=True)  # killed mid-way: tokenize running, packing never ran
    wait_for(lambda: not queued(ids), "the cancelled jobs to leave the queue")
    assert not (out / "pretrain_s1" / "manifest.json").exists()
    text = curate(out, *SLURM, "data.resume=true")
    assert "Skipping launch of axk1-filter" in text  # finished steps are not run again
    again = re.findall(r"launched successfully with \(last\) id=(\d+)", text)
    assert again and len(again) < 11
    wait_for(lambda: not queued(again), "the resumed jobs")
    assert shard_hashes(out) == shard_hashes(ref)


@pytest.mark.skipif(not cluster_up(), reason="no Slurm cluster answers (scripts/slurm_local.sh up)")
def test_pretraining_chain_waits_for_the_curation_jobs(tmp_path, tiny_data):
    """`make data LAUNCHER=slurm` then `make pretrain LAUNCHER=slurm`, without waiting in between:
    the first pre-training job depends (afterok) on the job that writes the manifests."""
    data = tmp_path / "data"
    curate(data, *SLURM)
    mix = (data / "slurm_job.json").read_text()
    mix_id = re.search(r'"job_id": "(\d+)"', mix)[1]
    assert queued([mix_id])
    p = subprocess.run([sys.executable, "launcher.py", "chain", "pretrain:pretrain_s1", "launcher=slurm",
                        f"data.root={data}", f"paths.runs={tmp_path / 'runs'}", "stage.budget.tiny.tokens=6144",
                        "stage.budget.tiny.batch_start=8", "stage.budget.tiny.batch_end=8",
                        "stage.budget.tiny.batch_increment=0", "--wait"],
                       cwd=ROOT, env=child_env(HYDRA_FULL_ERROR="1"), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(rf"pretrain_s1\t\d+\tafterok:{mix_id}\t", p.stdout), p.stdout
    assert (data / "pretrain_s1" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "tiny" / "pretrain_s1" / "DONE.json").is_file()
