"""The launcher against a real Slurm cluster (scripts/slurm_local.sh up): 2-task jobs that train
and checkpoint, an afterok chain, a failed stage that cancels its dependant, a job requeued mid-run
that resumes to the same final loss, and a Hydra multirun as Slurm jobs. Skipped when no
cluster answers; `make test` brings the local one up and down around pytest."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import launcher  # noqa: E402


def cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip("*~#") in ("idle", "mix", "alloc") for s in out.stdout.split())


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not cluster_up(), reason="no Slurm cluster answers (scripts/slurm_local.sh up)")]

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
# The stage under test: a toy with the stage contract (see tests/fixtures/conf/toy.yaml).
STAGE = ["--stages-dir", "tests/fixtures/stages", "--conf-dir", "tests/fixtures/conf", "launcher=slurm"]
TIMEOUT = 300


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launcher.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)


def submitted(p: subprocess.CompletedProcess) -> dict[str, str]:
    """stage name -> job id, from the lines the launcher prints (name, id, dependency, run dir)."""
    assert p.returncode == 0, p.stdout + p.stderr
    return {ln.split("\t")[0]: ln.split("\t")[1] for ln in p.stdout.splitlines() if ln.count("\t") == 3}


def job_field(jid: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f).get(key, "")


def wait_for(predicate, what: str, timeout: float = TIMEOUT):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stage `toy` (2 tasks, checkpoints every 3 of 12 steps) -> stage `second` (afterok)."""
    runs = tmp_path_factory.mktemp("chain")
    p = cli("chain", "toy", "toy,stage.name=second,stage.steps=4", *STAGE, f"paths.runs={runs}", "--wait")
    return runs, p


def test_two_task_job_trains_and_checkpoints(chain):
    runs, p = chain
    ids = submitted(p)
    assert "COMPLETED" in p.stdout, p.stdout
    run_dir = runs / "toy" / "toy"
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["world"] == 2 and done["step"] == 12  # one Slurm task per rank, torch.distributed over both
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000012"
    assert sorted(d.name for d in (run_dir / "checkpoints").glob("step-*")) == \
        [f"step-{s:08d}" for s in (3, 6, 9, 12)]
    # Logs of both tasks and the resolved config beside the job.
    job_dir = run_dir / "slurm" / ids["toy"]
    assert {f"{ids['toy']}_0_log.out", f"{ids['toy']}_1_log.out", "config.yaml"} <= {f.name for f in job_dir.iterdir()}
    assert "every_steps: 3" in (job_dir / "config.yaml").read_text()


def test_chain_second_stage_waits_for_the_first(chain):
    runs, p = chain
    ids = submitted(p)
    assert f"second\t{ids['second']}\tafterok:{ids['toy']}\t" in p.stdout
    assert job_field(ids["second"], "StartTime") >= job_field(ids["toy"], "EndTime")
    assert json.loads((runs / "toy" / "second" / "DONE.json").read_text())["step"] == 4
    st = cli("status", "--runs", str(runs))
    assert [ln.split()[:2] for ln in st.stdout.splitlines()[1:]] == [["toy/toy", "DONE"], ["toy/second", "DONE"]]


def test_failed_stage_cancels_its_dependant(tmp_path):
    p = cli("chain", "toy,stage.fail_at=1", "toy,stage.name=second", *STAGE, f"paths.runs={tmp_path}", "--wait")
    assert p.returncode == 1, p.stdout + p.stderr
    ids = submitted(subprocess.CompletedProcess(p.args, 0, p.stdout, p.stderr))
    assert launcher.slurm_state(ids["toy"]) == "FAILED"
    assert launcher.slurm_state(ids["second"]) == "CANCELLED"  # afterok can never be met
    rows = {r["stage"]: r["state"] for r in launcher.status(tmp_path)}
    assert rows == {"toy/toy": "FAILED", "toy/second": "CANCELLED"}


def test_requeued_job_resumes_with_the_same_final_loss(chain, tmp_path):
    runs, _ = chain
    reference = json.loads((runs / "toy" / "toy" / "DONE.json").read_text())["final_loss"]
    # The same stage (1 s per step, so it is mid-run when requeued) in a fresh run folder.
    ids = submitted(cli("run", "toy", *STAGE, "stage.sleep_s=1", f"paths.runs={tmp_path}"))
    jid, run_dir = ids["toy"], tmp_path / "toy" / "toy"
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), "the first checkpoint")
    subprocess.run(["scontrol", "requeue", jid], check=True)
    # Slurm holds a requeued job back (BeginTime) for a while; start it as soon as it is pending.
    wait_for(lambda: job_field(jid, "JobState") == "PENDING", "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], check=True)
    assert launcher.wait_jobs([("toy", jid)]) == 0
    assert job_field(jid, "Restarts") == "1"
    log = (run_dir / "slurm" / jid / f"{jid}_0_log.out").read_text()
    assert "restart 1" in log and "resumed from step-" in log, log
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["step"] == 12 and done["final_loss"] == reference


def test_multirun_two_points_as_slurm_jobs(tmp_path):
    # hydra-submitit-launcher: each point is its own Slurm job (array element) and output folder.
    p = subprocess.run([sys.executable, "tests/fixtures/stages/toy.py", "-m", "stage.steps=2,3", "launcher=slurm",
                        f"paths.runs={tmp_path}", "run_dir=${hydra:runtime.output_dir}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sweep = tmp_path / "multirun"
    done = [json.loads((sweep / str(i) / "DONE.json").read_text()) for i in (0, 1)]
    assert [(d["step"], d["world"]) for d in done] == [(2, 2), (3, 2)]
    jobs = sorted(d.name for d in (sweep / ".submitit").iterdir() if d.is_dir() and "_" in d.name)
    assert len(jobs) == 2 and all(launcher.slurm_state(j) == "COMPLETED" for j in jobs), jobs
