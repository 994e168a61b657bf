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
from conftest import cluster_up

ROOT = Path(__file__).resolve().parents[1]
import launcher  # noqa: E402


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not cluster_up(), reason="no Slurm cluster answers (scripts/slurm_local.sh up)")]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
# The real tiny pre-training (FSDP2 x EP 2 over 2 Slurm tasks), cut to 15 steps of 8 sequences
# with a checkpoint every 3 (the stage keeps the last 2).
PRETRAIN = ["launcher=slurm", f"data.root={ROOT / 'artifacts/data/tiny'}", "stage.budget.tiny.tokens=15360",
            "stage.budget.tiny.batch_start=8", "stage.budget.tiny.batch_end=8",
            "stage.budget.tiny.batch_increment=0", "checkpoint.every_steps=3", "log_every=1"]
# A toy stage with the same contract, for the failure case (tests/fixtures/conf/toy.yaml).
TOY = ["--stages-dir", "tests/fixtures/stages", "--conf-dir", "tests/fixtures/conf", "launcher=slurm"]
TIMEOUT = 420


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launcher.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)


def submitted(p: subprocess.CompletedProcess) -> dict[str, str]:
    """stage name -> job id, from the lines the launcher prints (name, id, dependency, run dir)."""
    return {ln.split("\t")[0]: ln.split("\t")[1] for ln in p.stdout.splitlines() if ln.count("\t") == 3}


def job_field(jid: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f).get(key, "")


def wait_for(predicate, what: str, timeout: float = TIMEOUT, poll: float = 0.5):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(poll)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data):
    """pretrain_s1 (15 steps) -> pretrain_s2 (3 steps, from s1's final checkpoint), afterok."""
    runs = tmp_path_factory.mktemp("chain")
    p = cli("chain", "pretrain:pretrain_s1", "pretrain:pretrain_s2,stage.budget.tiny.tokens=3072", *PRETRAIN,
            f"paths.runs={runs}", "--wait")
    assert p.returncode == 0, p.stdout + p.stderr
    return runs, p, submitted(p)


def test_two_task_pretraining_job_trains_and_checkpoints(chain):
    runs, p, ids = chain
    run_dir = runs / "tiny" / "pretrain_s1"
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["step"] == 15 and done["finished"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000015"
    assert (run_dir / "checkpoints" / "step-00000015").is_dir()
    # Logs of both tasks (ranks) and the resolved config beside the job.
    jid = ids["pretrain_s1"]
    job_dir = run_dir / "slurm" / jid
    assert {f"{jid}_0_log.out", f"{jid}_1_log.out", "config.yaml"} <= {f.name for f in job_dir.iterdir()}
    assert "task 1/2" in (job_dir / f"{jid}_1_log.out").read_text()
    assert "every_steps: 3" in (job_dir / "config.yaml").read_text()


def test_chain_second_stage_waits_for_the_first(chain):
    runs, p, ids = chain
    assert f"pretrain_s2\t{ids['pretrain_s2']}\tafterok:{ids['pretrain_s1']}\t" in p.stdout
    assert job_field(ids["pretrain_s2"], "StartTime") >= job_field(ids["pretrain_s1"], "EndTime")
    log = (runs / "tiny/pretrain_s2/slurm" / ids["pretrain_s2"] / f"{ids['pretrain_s2']}_0_log.out").read_text()
    assert "initialised from" in log and "pretrain_s1/checkpoints/step-00000015" in log
    assert json.loads((runs / "tiny/pretrain_s2/DONE.json").read_text())["step"] == 3
    st = cli("status", "--runs", str(runs))
    assert [ln.split()[:2] for ln in st.stdout.splitlines()[1:]] == \
        [["tiny/pretrain_s1", "DONE"], ["tiny/pretrain_s2", "DONE"]]


def test_failed_stage_cancels_its_dependant(tmp_path):
    p = cli("chain", "toy,stage.fail_at=1", "toy,stage.name=second", *TOY, f"paths.runs={tmp_path}", "--wait")
    assert p.returncode == 1, p.stdout + p.stderr
    ids = submitted(p)
    assert launcher.slurm_state(ids["toy"]) == "FAILED"
    assert launcher.slurm_state(ids["second"]) == "CANCELLED"  # afterok can never be met
    rows = {r["stage"]: r["state"] for r in launcher.status(tmp_path)}
    assert rows == {"toy/toy": "FAILED", "toy/second": "CANCELLED"}


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory) -> dict:
    """The toy stage run uninterrupted, submitted by the stage script itself (launcher=slurm)."""
    runs = tmp_path_factory.mktemp("toy")
    p = subprocess.run([sys.executable, "tests/fixtures/stages/toy.py", "launcher=slurm", f"paths.runs={runs}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[toy] step" not in p.stdout  # nothing trained in this process: it submitted
    assert launcher.wait_jobs([("toy", submitted(p)["toy"])]) == 0
    return json.loads((runs / "toy/toy/DONE.json").read_text())


def test_stage_script_with_launcher_slurm_submits_instead_of_running_here(toy_reference):
    assert toy_reference["world"] == 2 and toy_reference["step"] == 12


def test_preempted_job_is_requeued_by_submitit_and_resumes(toy_reference, tmp_path):
    # USR2 is what Slurm sends signal_delay_s before the time limit (and what submitit uses for
    # preemption): rank 0 checkpoints the submission and requeues the job itself.
    ids = submitted(cli("run", "toy", *TOY, "stage.sleep_s=1", f"paths.runs={tmp_path}"))
    jid, run_dir = ids["toy"], tmp_path / "toy" / "toy"
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    wait_for(lambda: job_field(jid, "JobState") == "PENDING", "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], check=True)
    assert launcher.wait_jobs([("toy", jid)]) == 0
    log = (run_dir / "slurm" / jid / f"{jid}_0_log.out").read_text()
    assert "Requeued job" in log and "restart 1" in log and "[toy] resumed from step-" in log, log
    assert json.loads((run_dir / "DONE.json").read_text())["final_loss"] == toy_reference["final_loss"]


def test_requeued_job_resumes_with_the_same_final_loss(chain, tmp_path):
    runs, _, _ = chain
    reference = json.loads((runs / "tiny/pretrain_s1/DONE.json").read_text())["final_loss"]
    # The same stage in a fresh run folder, requeued by Slurm as soon as its first checkpoint exists.
    p = cli("run", "pretrain:pretrain_s1", *PRETRAIN, f"paths.runs={tmp_path}")
    assert p.returncode == 0, p.stdout + p.stderr
    jid, run_dir = submitted(p)["pretrain_s1"], tmp_path / "tiny" / "pretrain_s1"
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), "the first checkpoint", poll=0.05)
    # Freeze the job first (SIGSTOP): a requeue of a running job sends SIGTERM, which submitit
    # ignores, and the SIGKILL comes KillWait (2 s) or more later; 12 tiny steps can finish in that
    # time on a fast CPU, and then nothing is resumed (seen on CI). A suspended job is killed at once.
    subprocess.run(["scontrol", "suspend", jid], check=True)
    subprocess.run(["scontrol", "requeue", jid], check=True)
    # Slurm holds a job requeued from SUSPENDED (JobHeldAdmin) and delays any requeued job
    # (BeginTime); release it and start it as soon as it is pending.
    wait_for(lambda: job_field(jid, "JobState") == "PENDING", "the requeued job to be pending")
    subprocess.run(["scontrol", "release", jid], check=False)
    subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], check=True)
    assert launcher.wait_jobs([("pretrain_s1", jid)]) == 0
    assert job_field(jid, "Restarts") == "1"
    log = (run_dir / "slurm" / jid / f"{jid}_0_log.out").read_text()
    assert "restart 1" in log and "resumed from" in log, log[-3000:]
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["step"] == 15 and done["final_loss"] == pytest.approx(reference, rel=1e-6)


def test_multirun_two_points_as_slurm_jobs(tmp_path, tiny_data):
    # hydra-submitit-launcher: each point is its own Slurm job (array element) and output folder;
    # one rank each (parallelism=none) so that both fit on the 2-CPU test node at once.
    p = subprocess.run([sys.executable, "stages/pretrain.py", "-m", "optim.lr=1e-4,3e-4", *PRETRAIN,
                        "stage.budget.tiny.tokens=2048", "parallelism=none", "hardware.procs_per_node=1",
                        f"paths.runs={tmp_path}", "run_dir=${hydra:runtime.output_dir}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sweep = next((tmp_path / "multirun").iterdir())  # <paths.runs>/multirun/<time>/<job num>
    done = [json.loads((sweep / str(i) / "DONE.json").read_text()) for i in (0, 1)]
    assert [d["step"] for d in done] == [2, 2] and done[0]["final_loss"] != done[1]["final_loss"]
    from omegaconf import OmegaConf
    assert [OmegaConf.load(sweep / str(i) / ".hydra/config.yaml").optim.lr for i in (0, 1)] == [1e-4, 3e-4]
    jobs = sorted(d.name for d in (sweep / ".submitit").iterdir() if d.is_dir() and "_" in d.name)
    assert len(jobs) == 2 and launcher.wait_jobs([(j, j) for j in jobs]) == 0, jobs  # COMPLETING -> COMPLETED
