"""The streaming curation chain end to end on the tiny corpus (real datatrove, real files): 1 task
and 2 parallel tasks give the same stage totals and on-target mixtures, and a re-run with
data.resume=true over an existing work folder finishes what is missing instead of stopping."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_env, stage_module

curate = stage_module("curate")
pytestmark = pytest.mark.slow
STAGES = ("pretrain_s1", "pretrain_s2", "pretrain_s3")


def run_curate(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "stages/curate.py", f"data.root={out}", f"data.work_dir={out}/_work",
                        f"hydra.run.dir={out}/hydra", *overrides], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def manifests(out: Path) -> dict:
    return {s: json.loads((out / s / "manifest.json").read_text()) for s in STAGES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    one, two = tmp_path_factory.mktemp("one_task"), tmp_path_factory.mktemp("two_tasks")
    run_curate(one)
    run_curate(two, "data.executor.tasks=2", "data.executor.workers=2")
    return one, two


def test_one_and_two_tasks_give_the_same_totals_and_on_target_mixtures(runs):
    one, two = (manifests(r) for r in runs)
    for s in STAGES:
        a, b = one[s]["total_tokens"], two[s]["total_tokens"]
        assert abs(a - b) <= 0.005 * a, (s, a, b)
        for m in (one[s], two[s]):
            for c, r in m["mixture"].items():
                assert abs(r["realised_pct"] - r["weight_pct"]) < 0.2, (s, c, r)
    assert two["pretrain_s1"]["config"]["executor"]["tasks"] == 2
    assert one["pretrain_s1"]["docs_read"] == two["pretrain_s1"]["docs_read"]


def test_resume_reuses_finished_tasks_and_completes_the_rest(runs):
    one = runs[0]
    before = manifests(one)
    work = one / "_work"
    # As after a Slurm submission whose last job did not finish: the work folder exists, every
    # step but the packing has its completion marker.
    for f in (work / "logs" / "mix" / "completions").iterdir():
        f.unlink()
    for s in STAGES:
        (one / s / "manifest.json").unlink()
    tokens_mtime = (work / "tokens" / "00000.tokens").stat().st_mtime_ns
    log = work / "logs" / "console.log"  # datatrove's console output (the stage prints one line instead)
    seen = log.read_text().count("have already been completed")
    run_curate(one, "data.resume=true")
    assert log.read_text().count("have already been completed") - seen == 10  # every step but the packing
    assert (work / "tokens" / "00000.tokens").stat().st_mtime_ns == tokens_mtime
    after = manifests(one)
    for s in STAGES:
        assert [x["sha256"] for x in after[s]["shards"]] == [x["sha256"] for x in before[s]["shards"]]


def test_a_run_without_resume_starts_clean_and_one_with_resume_keeps_the_work(tmp_path):
    work = tmp_path / "work"
    (work / "logs" / "filter" / "completions").mkdir(parents=True)
    (work / "logs" / "filter" / "completions" / "00000").touch()
    curate.prepare_work(work, resume=True)
    assert (work / "logs" / "filter" / "completions" / "00000").exists()
    curate.prepare_work(work, resume=False)
    assert work.is_dir() and not any(work.iterdir())
