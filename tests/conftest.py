"""Shared fixtures: composed Hydra configs, a one-process gloo group, the tiny data artifacts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import configs  # noqa: E402,F401  (registers the config resolvers)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Set in this process by training.init_distributed (the single_process_group fixture): a child
# stage that inherits them joins our rendezvous port instead of picking its own (EADDRINUSE).
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A port nothing listens on now (torchrun rendezvous, servers started by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """os.environ for a stage run as a child process: no inherited rendezvous, PYTHONPATH=ROOT."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def compose_cfg(name: str = "pretrain", overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides or [])


@pytest.fixture(scope="session")
def single_process_group():
    """A world of one (gloo), for code that needs torch.distributed but not several ranks."""
    import training

    training.init_distributed(compose_cfg().hardware)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_data() -> Path:
    """The tiny tokenizer + curated stage datasets (built once by `make data` if missing)."""
    root = ROOT / "artifacts" / "data" / "tiny"
    if not (root / "pretrain_s3" / "manifest.json").exists():
        subprocess.run(["make", "-C", str(ROOT), "artifacts/data/tiny/pretrain_s3/manifest.json"], check=True)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
