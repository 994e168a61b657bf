"""The run lease and the checkpoint manifest on their own (one process, no model): who is judged
gone, the heartbeat, and what verify() catches. The stage-level runs are in test_run_safety.py."""

import json
import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from kit import checkpoint_manifest, run_lease

LEASE = OmegaConf.create({"heartbeat_s": 60, "stale_after_s": 1800})


def test_a_live_holder_is_refused_and_the_lease_file_is_untouched(tmp_path):
    lease, line = run_lease.acquire(tmp_path, LEASE, "pretrain_s1")
    assert line == "" and lease is not None
    before = (tmp_path / run_lease.LEASE_FILE).read_text()
    # another process on the same folder (a live holder: this one)
    code = (f"from omegaconf import OmegaConf; from kit import run_lease; "
            f"lease, line = run_lease.acquire('{tmp_path}', OmegaConf.create({dict(LEASE)}), 'pretrain_s1'); "
            f"print(line); assert lease is None")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1 and f"is held by pretrain_s1 pid {os.getpid()}" in out, out
    assert (tmp_path / run_lease.LEASE_FILE).read_text() == before
    lease.release()
    assert not (tmp_path / run_lease.LEASE_FILE).exists()


def me(**changes) -> dict:
    return {**run_lease.holder_record("pretrain_s1"), **changes}


def test_who_is_judged_gone():
    now = time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "no longer running" in run_lease.stale_reason(me(pid=dead.pid, pid_start="1"), me(pid=1), 1800, now)
    # a pid reused by another process after the holder died: its start time differs
    assert "no longer running" in run_lease.stale_reason(me(pid=os.getpid(), pid_start="0"), me(pid=1), 1800, now)
    # a live holder on this host with a fresh heartbeat is not gone
    assert run_lease.stale_reason(me(pid=os.getppid(), pid_start=None), me(pid=1), 1800, now) is None
    # another host: only its heartbeat (or its Slurm job) tells
    other = me(host="node-that-is-not-here", pid=4242)
    assert run_lease.stale_reason({**other, "heartbeat": now - 60}, me(), 1800, now) is None
    assert "heartbeat is 1900 s old" in run_lease.stale_reason({**other, "heartbeat": now - 1900}, me(), 1800, now)
    # Slurm requeued this very job: the job re-running takes its own lease back, whatever the host
    requeued = me(slurm_job="777", slurm_restart=1)
    assert "requeued job 777 (restart 0 -> 1)" in run_lease.stale_reason(
        {**other, "slurm_job": "777", "slurm_restart": 0}, requeued, 1800, now)
    # the same job at the same restart (a second srun in one allocation) is a second writer
    assert run_lease.stale_reason({**other, "slurm_job": "777", "slurm_restart": 1}, requeued, 1800, now) is None


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lease, _ = run_lease.acquire(tmp_path, OmegaConf.create({"heartbeat_s": 0, "stale_after_s": 1800}), "sft")
    first = json.loads((tmp_path / run_lease.LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.01)
    lease.heartbeat()
    assert json.loads((tmp_path / run_lease.LEASE_FILE).read_text())["heartbeat"] > first
    # judged gone and taken over by another process: the old holder stops instead of writing on
    (tmp_path / run_lease.LEASE_FILE).write_text(json.dumps(me(stage="sft", pid=4242, token="theirs")))
    with pytest.raises(run_lease.LeaseHeld, match="taken over by sft pid 4242"):
        lease.heartbeat()


def test_manifest_catches_a_missing_a_short_and_a_changed_file(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"m" * 10)
    (tmp_path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    manifest = checkpoint_manifest.write(tmp_path, "crc32")
    assert manifest["format_version"] == checkpoint_manifest.FORMAT_VERSION
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp"}
    assert checkpoint_manifest.verify(tmp_path, use_checksums=True) is None
    shard = tmp_path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x10  # one bit
    shard.write_bytes(bytes(data))
    assert checkpoint_manifest.verify(tmp_path, use_checksums=False) is None  # sizes alone cannot see it
    assert "__0_0.distcp: crc32" in checkpoint_manifest.verify(tmp_path, use_checksums=True)
    shard.write_bytes(bytes(data[:100]))
    assert "__0_0.distcp: 100 bytes, the save wrote 16384" in checkpoint_manifest.verify(tmp_path, use_checksums=False)
    shard.unlink()
    assert "__0_0.distcp: missing" in checkpoint_manifest.verify(tmp_path, use_checksums=False)
