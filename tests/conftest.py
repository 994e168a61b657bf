"""Shared fixtures: composed Hydra configs, a one-process gloo group, the tiny data artifacts."""

import importlib.util
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from kit import config_checks  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Set in this process by training.init_distributed (the single_process_group fixture): a child
# stage that inherits them joins our rendezvous port instead of picking its own (EADDRINUSE).
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cluster_up() -> bool:
    """A Slurm cluster answers with a usable node (scripts/slurm_local.sh up): the slurm tests' skip."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip("*~#") in ("idle", "mix", "alloc") for s in out.stdout.split())


def free_port() -> int:
    """A port nothing listens on now (torchrun rendezvous, servers started by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """os.environ for a stage run as a child process: no inherited rendezvous, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def stage_module(name: str):
    """A stage script (stages/<name>.py) imported as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(f"stages.{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_cfg(name: str = "pretrain", overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides or [])


@pytest.fixture(scope="session")
def single_process_group():
    """A world of one (gloo), for code that needs torch.distributed but not several ranks."""
    from kit import training

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
