"""Run generated code against a benchmark's tests in a sandboxed child Python.

    box = Sandbox(time_s=10, memory_mb=2048, output_mb=16)
    box.run(source, stdin="")   # -> Result(passed, reason, stdout)

The child is `python -I -B` in a fresh temporary folder (its working directory), with
  - resource limits (setrlimit): CPU seconds, address space, file size, no core files; a wall-clock
    timeout kills its whole process group (a loop that sleeps is killed too);
  - an audit hook (PEP 578, cannot be removed once added) installed before the code runs, which
    refuses socket creation and connection, any write/delete/rename outside the folder, starting
    processes (subprocess, os.system, exec, fork: a child would not carry the hook) and ctypes
    (raw calls around the hook);
  - stdout and stderr written to files in the folder, so the file-size limit caps them too.
The folder is deleted afterwards. This keeps honest benchmark code honest; it is not a boundary
against hostile code (README "Benchmarks").
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUARD = r'''
import os, runpy, sys
ROOT = os.path.realpath(sys.argv[1])
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
NO_NETWORK = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"}
NO_PROCESS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.forkpty", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata"}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
               "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}

def inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor: its opening was checked
    path = os.path.realpath(os.fsdecode(path))
    return path == ROOT or path.startswith(ROOT + os.sep)

def guard(event, args):
    if event in NO_NETWORK:
        raise PermissionError("sandbox: network is off")
    if event in NO_PROCESS:
        raise PermissionError(f"sandbox: {event} is off")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & WRITE) and not inside(args[0]):
            raise PermissionError(f"sandbox: no writes outside the sandbox folder ({args[0]})")
    if event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                raise PermissionError(f"sandbox: {event} outside the sandbox folder ({path})")

sys.addaudithook(guard)
sys.argv = ["solution.py"]
runpy.run_path(os.path.join(ROOT, "solution.py"), run_name="__main__")
'''


@dataclass
class Result:
    passed: bool
    reason: str
    stdout: str = ""


class Sandbox:
    def __init__(self, time_s: float, memory_mb: int, output_mb: int, python: str = sys.executable):
        self.time_s, self.memory_mb, self.output_mb, self.python = time_s, memory_mb, output_mb, python

    def _limits(self) -> None:  # runs in the child between fork and exec
        cpu = max(1, int(self.time_s))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        memory = self.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        output = self.output_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, source: str, stdin: str = "") -> Result:
        with tempfile.TemporaryDirectory(prefix="axk1-sandbox-") as folder:
            root = Path(folder)
            (root / "solution.py").write_text(source, encoding="utf-8")
            (root / "stdin.txt").write_text(stdin, encoding="utf-8")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder,
                   "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
            with open(root / "stdin.txt", "rb") as fin, open(root / "stdout.txt", "wb") as fout, \
                    open(root / "stderr.txt", "wb") as ferr:
                proc = subprocess.Popen([self.python, "-I", "-B", "-c", GUARD, folder], cwd=folder, env=env,
                                        stdin=fin, stdout=fout, stderr=ferr, preexec_fn=self._limits,
                                        start_new_session=True)
                try:
                    code = proc.wait(self.time_s + 1)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return Result(False, f"timeout: killed after {self.time_s:g} s")
            out = (root / "stdout.txt").read_text(encoding="utf-8", errors="replace")
            err = (root / "stderr.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if code == 0:
            return Result(True, "ok", out)
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            return Result(False, f"timeout: CPU limit {self.time_s:g} s", out)
        return Result(False, f"exit {code}: {err[-1][:200] if err else 'no message'}", out)


FUNCTIONAL_CALL = '''
import json as _json, sys as _sys
_args = [_json.loads(_line) for _line in _sys.stdin.read().splitlines() if _line.strip()]
_target = getattr(Solution(), {name!r}) if "Solution" in globals() else globals()[{name!r}]
print(_json.dumps(_target(*_args)))
'''


def _lines(text: str) -> list[list[str]]:
    rows = [line.split() for line in text.strip().splitlines()]
    return [row for row in rows if row]


def run_case(box: Sandbox, code: str, case: dict, func_name: str | None) -> Result:
    """One LiveCodeBench case: `stdin` (program output against the expected text, whitespace-
    insensitive) or `functional` (Solution().<func_name>(*inputs as JSON lines) against JSON)."""
    if case.get("testtype") == "functional":
        result = box.run(code + "\n" + FUNCTIONAL_CALL.format(name=func_name), stdin=case["input"])
        if not result.passed:
            return result
        try:
            same = json.loads(result.stdout.strip().splitlines()[-1]) == json.loads(case["output"])
        except (json.JSONDecodeError, IndexError):
            same = False
        return Result(same, "ok" if same else "wrong answer", result.stdout)
    result = box.run(code, stdin=case["input"])
    if not result.passed:
        return result
    same = _lines(result.stdout) == _lines(case["output"])
    return Result(same, "ok" if same else "wrong answer", result.stdout)
