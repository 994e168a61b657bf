"""A mistake on the command line is one line, printed by the launching process before torchrun
starts a rank: the README's make targets with a typo, a bad layout, a missing input."""

import os
import subprocess
from pathlib import Path

import pytest

from kit import preflight

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`make ...` as a user types it; stdout and stderr together, as the console shows them. Without
    the variables of an enclosing make (`make test` runs pytest): a nested make prints "Entering
    directory" lines a user's top-level make does not."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=env)


def assert_refused_before_ranks(p: subprocess.CompletedProcess, runs: Path, max_lines: int) -> list[str]:
    lines = p.stdout.strip().splitlines()
    assert p.returncode != 0, p.stdout
    assert len(lines) <= max_lines, p.stdout
    # nothing started: no torchrun, no stage line, no rank output, no Hydra run folder
    assert not any(w in p.stdout for w in ("torchrun", "==", "rank", "Traceback")), p.stdout
    assert not runs.exists() or not any(runs.rglob("*")), list(runs.rglob("*"))
    return [line for line in lines if line.startswith("axk1: ")]


def test_unknown_key_names_the_closest_known_key(tiny_data, tmp_path):
    p = make("pretrain", f"ARGS=optim.lrr=1e-3 paths.runs={tmp_path / 'runs'}")
    problems = assert_refused_before_ranks(p, tmp_path / "runs", max_lines=3)
    assert len(problems) == 1 and "command line optim.lrr=1e-3" in problems[0], p.stdout
    assert "closest: optim.lr" in problems[0] and "+optim.lrr" not in p.stdout, p.stdout


def test_a_value_from_the_command_line_is_blamed_on_it(tiny_data, tmp_path):
    p = make("pretrain", f"ARGS=parallelism.ep=4 paths.runs={tmp_path / 'runs'}")
    problems = assert_refused_before_ranks(p, tmp_path / "runs", max_lines=3)
    assert problems == ["axk1: command line parallelism.ep=4: expected to divide dp_shard*cp=2"], p.stdout


def test_post_without_pretraining_names_make_pretrain(tmp_path):
    p = make("post", f"ARGS=paths.runs={tmp_path / 'runs'}")
    problems = assert_refused_before_ranks(p, tmp_path / "runs", max_lines=2)
    assert len(problems) == 1 and "`make pretrain` makes it" in problems[0], p.stdout
    assert "init_from=pretrain_s3_32k" in problems[0], p.stdout


def test_blame_rewrites_only_the_fields_the_command_line_set():
    line = "parallelism/cpu_fsdp_ep.yaml ep=4: expected to divide dp_shard*cp=2"
    assert preflight.blame_command_line(line, ["parallelism.ep=4"]) == \
        "command line parallelism.ep=4: expected to divide dp_shard*cp=2"
    assert preflight.blame_command_line(line, ["parallelism=cpu_fsdp_ep", "optim.lr=1"]) == line
    nested = "stage/pretrain_s1.yaml seq_len=4096: exceeds model.max_seq_len=1024"
    assert preflight.blame_command_line(nested, ["stage.budget.tiny.seq_len=4096"]).startswith(
        "command line stage.budget.tiny.seq_len=4096: exceeds")


@pytest.mark.parametrize("stage,target", [("pretrain_s2", "make pretrain"), ("mod_sft", "make post"),
                                          ("merge", "make post"), ("rl", "make post MODEL=axk1_519b")])
def test_make_target_of_a_stage(stage, target):
    import launcher
    model = "axk1_519b" if stage == "rl" else "tiny"
    assert preflight.make_target_for(stage, launcher.CHAINS, model) == target


def test_an_endpoint_evaluation_leaves_the_checkpoint_table_untouched(tiny_data, tmp_path):
    from conftest import compose_cfg, free_port, stage_module
    from kit.openai_client import EndpointError

    evaluate = stage_module("evaluate")
    table = tmp_path / "tiny" / "evaluate" / "metrics.json"  # the smoke chain's six-checkpoint table
    table.parent.mkdir(parents=True)
    table.write_text('{"rows": {"base": {}, "RL": {}}}')
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the stage fails at its first request
    cfg = compose_cfg("evaluate", [f"paths.runs={tmp_path}", f"endpoint={endpoint}"])
    assert cfg.run_dir == f"{tmp_path}/tiny/evaluate_endpoint_127.0.0.1_{endpoint.rsplit(':', 1)[1]}"
    with pytest.raises(EndpointError, match="is the server up"):
        evaluate.run(cfg)
    # A second checkpoint evaluation is refused in one line before loading anything, unless told.
    with pytest.raises(FileExistsError, match="holds a finished evaluation") as refused:
        evaluate.run(compose_cfg("evaluate", [f"paths.runs={tmp_path}"]))
    assert "\n" not in str(refused.value) and "overwrite=true" in str(refused.value)
    assert table.read_text() == '{"rows": {"base": {}, "RL": {}}}'
    import launcher  # ... and the launcher refuses the same run before starting it
    cfg, overrides = launcher.compose("evaluate", [f"paths.runs={tmp_path}"], ROOT / "conf")
    assert any("holds a finished evaluation" in p for p in launcher.problems("evaluate", cfg, overrides, set()))
