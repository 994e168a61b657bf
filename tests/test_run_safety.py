"""Runs that survive a real cluster, on the real pre-training stage (torchrun, 2 CPU ranks, FSDP2 x
EP 2, DCP): one writer per run folder, damaged checkpoints fall back to the newest intact one, and
a checkpoint in the previous optimizer layout resumes through its migration."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from conftest import ROOT, child_env, compose_cfg, free_port
from kit import checkpoint_manifest, checkpoints, run_lease, training

pytestmark = pytest.mark.slow

STAGE = "tiny/pretrain_s1"
# 9 steps of 8 sequences x 128 tokens, a checkpoint every 3 (all three kept)
NINE = ["parallelism=cpu_fsdp_ep", "stage.budget.tiny.tokens=9216", "stage.budget.tiny.batch_start=8",
        "stage.budget.tiny.batch_end=8", "stage.budget.tiny.batch_increment=0", "checkpoint.every_steps=3",
        "checkpoint.keep_last=3", "log_every=1"]


def pretrain(runs: Path, overrides: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "stages/pretrain.py", f"paths.runs={runs}", f"data.root={ROOT / 'artifacts/data/tiny'}", *NINE, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


def losses(runs: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before and after a resume) keeps the last."""
    return {r["step"]: r["loss"] for r in map(json.loads, (runs / STAGE / "metrics.jsonl").read_text().splitlines())}


def lines_with(text: str, needle: str) -> list[str]:
    return [ln for ln in text.splitlines() if needle in ln]


def stage_traceback(out: str) -> bool:
    """A traceback through the kit's own code (torchrun's report of a failed worker is its own)."""
    return any(f'File "{ROOT / part}' in out for part in ("stages", "kit", "model.py", "data.py"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data) -> Path:
    """The 9 steps uninterrupted; its checkpoints (steps 3, 6, 9) are what the tests damage."""
    runs = tmp_path_factory.mktemp("reference")
    p = pretrain(runs)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(losses(runs)) == list(range(1, 10))
    assert not (runs / STAGE / run_lease.LEASE_FILE).exists()  # released at the end
    manifest = json.loads((runs / STAGE / "checkpoints/step-00000009" / checkpoint_manifest.MANIFEST).read_text())
    assert manifest["format_version"] == checkpoint_manifest.FORMAT_VERSION and manifest["checksum"] == "crc32"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json"} <= set(manifest["files"])
    return runs


def copy_stopped_at_9(reference: Path, runs: Path) -> Path:
    """The reference folder as a run killed after its step-9 checkpoint (no DONE.json)."""
    shutil.copytree(reference / STAGE, runs / STAGE)
    (runs / STAGE / "DONE.json").unlink()
    return runs / STAGE / "checkpoints"


def test_second_process_on_a_held_run_folder_refuses_in_one_line_and_writes_nothing(tmp_path, tiny_data):
    run_dir = tmp_path / STAGE
    lease, _ = run_lease.acquire(run_dir, compose_cfg().lease, "pretrain_s1")  # this test process holds it
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    p = pretrain(tmp_path)
    assert p.returncode != 0
    held = lines_with(p.stdout + p.stderr, "is held by")
    assert len(held) == 1 and f"pid {lease.record['pid']}" in held[0], p.stdout + p.stderr
    assert not stage_traceback(p.stdout + p.stderr)
    # Hydra keeps its own record of every invocation in <run_dir>/hydra before the stage runs;
    # the stage itself wrote nothing (no config.yaml, metrics, checkpoints) and left the lease alone.
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
             if p.is_file() and p.relative_to(run_dir).parts[0] != "hydra"}
    assert after == before
    lease.release()


def test_damaged_checkpoints_and_a_killed_holder_resume_from_the_newest_intact_one(reference, tmp_path):
    ckpts = copy_stopped_at_9(reference, tmp_path)
    shard = ckpts / "step-00000009" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a storage fault cut the latest short
    shard = ckpts / "step-00000006" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04  # and flipped one bit of the one before: DCP itself loads that without a word
    shard.write_bytes(bytes(data))
    # The killed job's lease: taken by a real process, which then dies by SIGKILL.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from omegaconf import OmegaConf; "
                               "from kit import run_lease; run_lease.acquire(sys.argv[1], OmegaConf.create("
                               "{'heartbeat_s': 60, 'stale_after_s': 1800}), 'pretrain_s1'); print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path / STAGE)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    p = pretrain(tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert len(lines_with(out, f"took over the lease on {tmp_path / STAGE} from pretrain_s1 pid {holder.pid}")) == 1
    truncated = lines_with(out, "checkpoint step-00000009 is damaged")
    assert len(truncated) == 1 and "__1_0.distcp:" in truncated[0] and "the save wrote" in truncated[0], out
    flipped = lines_with(out, "checkpoint step-00000006 is damaged")
    assert len(flipped) == 1 and "__0_0.distcp: crc32" in flipped[0], out
    assert len(lines_with(out, "resumed from")) == 1 and "step-00000003" in lines_with(out, "resumed from")[0]
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 10))
    assert all(abs(ref[s] - got[s]) < 1e-5 for s in range(4, 10)), [(s, ref[s], got[s]) for s in range(4, 10)]
    # set aside for a look, out of the way of later resumes; the run wrote fresh ones
    assert {"step-00000006.damaged", "step-00000009.damaged", "step-00000006", "step-00000009"} <= \
        {x.name for x in ckpts.iterdir()}
    assert (ckpts / "latest").read_text() == "step-00000009"
    assert checkpoint_manifest.verify(ckpts / "step-00000009", use_checksums=True) is None


def save_format_1(path: Path, net, opt, train_state: dict) -> None:
    """The kit's checkpoint save before commit caee690 (optimizer param_groups by index), kept
    here to write the previous layout."""
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    (path / "train_state.json").write_text(json.dumps(train_state))


def test_previous_optimizer_layout_migrates_with_the_same_next_step_loss(reference, tmp_path, single_process_group):
    # The reference's step-6 state, rewritten in format 1 by the old code path (in this process, one rank).
    cfg = compose_cfg("pretrain", ["parallelism=none"])
    parts, _, spec, pdims, _ = training.build_model_parts(cfg, 1, bias_update_rate=cfg.stage.bias_update_rate,
                                                          seed=cfg.seed)
    opt = training.build_optimizer(parts[0], cfg.optim, spec, pdims)
    state = checkpoints.load_checkpoint(reference / STAGE / "checkpoints/step-00000006", parts, [opt])
    old = tmp_path / STAGE / "checkpoints"
    save_format_1(old / "step-00000006", parts[0], opt, state)
    (old / "latest").write_text("step-00000006")
    assert checkpoints.checkpoint_format(old / "step-00000006") == 1
    # The router biases are model buffers: they travel in the same DCP checkpoint as the weights
    # (the loader position and the schedules' counters in its train_state.json).
    keys = dcp.FileSystemReader(str(old / "step-00000006")).read_metadata().state_dict_metadata
    assert sum(k.endswith("moe.expert_bias_E") for k in keys) >= cfg.model.n_layers - cfg.model.n_dense_layers

    # Every checkpoint damaged: one line, and nothing set aside (the user decides).
    broken = tmp_path / "broken" / "checkpoints"
    shutil.copytree(reference / STAGE / "checkpoints", broken)
    for step in ("step-00000003", "step-00000006", "step-00000009"):
        shard = broken / step / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SystemExit) as stop:
        checkpoints.resume(broken.parent, parts, [opt], "pretrain_s1", "crc32")
    assert str(stop.value).startswith(f"[pretrain_s1] no intact checkpoint in {broken} (step-00000009, "
                                      f"step-00000006, step-00000003 all damaged") and "\n" not in str(stop.value)
    assert sorted(x.name for x in broken.iterdir()) == ["latest", "step-00000003", "step-00000006", "step-00000009"]

    # A format this kit does not know stops in one line naming both versions.
    future = tmp_path / "future" / "checkpoints" / "step-00000006"
    shutil.copytree(reference / STAGE / "checkpoints/step-00000006", future)
    (future / "manifest.json").write_text(json.dumps({"format_version": 99, "checksum": None, "files": {}}))
    with pytest.raises(checkpoints.CheckpointFormatError, match="checkpoint format 99, this kit reads formats "
                       r"\[1, 2\] and writes 2"):
        checkpoints.resume(tmp_path / "future", parts, [opt], "pretrain_s1", "crc32")

    p = pretrain(tmp_path)  # 2 ranks resume the 1-rank format-1 checkpoint
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert len(lines_with(out, "step-00000006 is checkpoint format 1 (optimizer param_groups by index); "
                               "migrated to format 2")) == 1, out
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == [7, 8, 9]
    assert all(abs(ref[s] - got[s]) < 1e-5 for s in (7, 8, 9)), [(s, ref[s], got[s]) for s in (7, 8, 9)]
    assert checkpoints.checkpoint_format(old / "step-00000009") == 2
