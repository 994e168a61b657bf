"""Launcher without a cluster: cluster configs, the pre-submission check, the sbatch script it
would submit, and the local launcher (torchrun chain, submitit-local multirun) on the toy stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
import launcher  # noqa: E402

TOY = ["--stages-dir", "tests/fixtures/stages", "--conf-dir", "tests/fixtures/conf"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launcher.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("hw,gpus,batch", [("h200_1024", 1024, 16384), ("h200_1536", 1536, 18432)])
def test_paper_clusters_and_their_batch(hw, gpus, batch):
    # SPEC 3: 16,384 sequences of 4096 on 1,024 H200s, 18,432 on 1,536; 8 GPUs per node.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"hardware={hw}", "launcher=slurm"], return_hydra_config=True)
    h = cfg.hardware
    assert (h.gpus_per_node, h.procs_per_node, h.nodes * h.gpus_per_node) == (8, 8, gpus)
    assert h.global_batch == batch
    assert cfg.launcher.name == "slurm" and cfg.hydra.launcher.tasks_per_node == 8


def test_wrong_combination_is_refused_before_submission_with_one_line(tmp_path):
    # 1,536 GPUs with PP 16 x EP 8 -> DP 96, and a batch (16,000) that 96 does not divide.
    bad = ["pretrain:pretrain_s2", "model=axk1_519b", "optim=adamw", "hardware=h200_1536",
           "parallelism=axk1_pretrain", "hardware.global_batch=16000", "launcher=slurm", f"paths.runs={tmp_path}"]
    p = cli("run", *bad)
    assert p.returncode == 2, p.stderr
    # one line per problem: the batch, and the stage this one starts from (never trained here)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("axk1: ") for line in lines), p.stderr
    assert "16000" in lines[0] and "96" in lines[0], p.stderr
    assert "init_from=pretrain_s1" in lines[1] and "`make pretrain MODEL=axk1_519b`" in lines[1], p.stderr
    assert not list(tmp_path.rglob("jobs.jsonl")), "nothing may be submitted"
    # `check` lists every problem, one per line; the batch one names the numbers.
    p = cli("check", *bad)
    assert p.returncode == 2
    assert any("16000" in line and "96" in line for line in p.stderr.splitlines()), p.stderr


def test_sbatch_script_from_hardware_and_launcher_config(tmp_path):
    cfg = launcher.compose("toy", ["launcher=slurm", "hardware=h200_1536", "launcher.partition=gpu",
                                   "launcher.account=axk1", "launcher.qos=high", f"paths.runs={tmp_path}"],
                           ROOT / "tests/fixtures/conf")[0]
    ex = launcher.slurm_executor(cfg, tmp_path / "%j", "axk1-test", after=["11", "12"])
    from submitit.slurm.slurm import _make_sbatch_string
    text = _make_sbatch_string(command="python -m submitit.core._submit X", folder=tmp_path / "%j",
                               **ex._executor.parameters)
    for line in ["--nodes=192", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                 "--mem=1800GB", "--partition=gpu", "--account=axk1", "--qos=high", "--time=2880",
                 "--dependency=afterok:11:12", "--kill-on-invalid-dep=yes", "--signal=USR2@120"]:
        assert f"#SBATCH {line}" in text, (line, text)
    assert "#SBATCH --requeue" in text
    assert "PYTHONPATH" not in text  # the tasks find the kit through its editable install


def test_spec_parsing():
    stages = ROOT / "tests/fixtures/stages"
    assert launcher.parse_spec("toy:s2,a=1,b=2+toy", stages) == [
        (stages / "toy.py", ["stage=s2", "a=1", "b=2"]), (stages / "toy.py", [])]
    with pytest.raises(launcher.LaunchError, match="no stage script"):
        launcher.parse_spec("nope", stages)
    assert launcher.CHAINS["pretrain"][0] == "pretrain:pretrain_s1"


@pytest.mark.slow
def test_local_chain_stops_at_a_failed_stage(tmp_path):
    p = cli("chain", "toy,stage.fail_at=2,stage.steps=4", "toy,stage.name=second", *TOY,
            "launcher=local", f"paths.runs={tmp_path}")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "not started: second" in p.stdout
    assert not (tmp_path / "toy/second").exists()
    rows = {r["stage"]: r for r in launcher.status(tmp_path)}
    assert rows["toy/toy"]["state"] == "FAILED"
    assert rows["toy/toy"]["checkpoint"] == "-"  # failed at step 2, before the first checkpoint (3)


@pytest.mark.slow
def test_local_multirun_each_point_in_its_own_folder(tmp_path):
    # hydra-submitit-launcher's local executor: one process per rank, like a Slurm job.
    p = subprocess.run([sys.executable, "tests/fixtures/stages/toy.py", "-m", "stage.steps=2,3",
                        "launcher=local", f"paths.runs={tmp_path}", "run_dir=${hydra:runtime.output_dir}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = [json.loads((tmp_path / "multirun" / str(i) / "DONE.json").read_text()) for i in (0, 1)]
    assert [(d["step"], d["world"]) for d in done] == [(2, 2), (3, 2)]
