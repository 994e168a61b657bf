"""metrics_log.py and stages/report.py: the ETA arithmetic, the dashboard tags, a failing backend,
and short real stage runs (pre-training on 2 ranks, SFT, RL) whose TensorBoard events and offline
W&B run hold what metrics.jsonl holds."""

import json
import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import pytest
from conftest import ROOT, child_env, compose_cfg, free_port

from kit import metrics_log


def test_eta_arithmetic():
    eta = metrics_log.Eta(total=1000, smoothing=0.5)
    # first step (warm-up): 100 units in 10 s; 900 left at 10 units/s
    assert eta.update(done=100, work=100, secs=10.0) == pytest.approx(90.0)
    # the second step replaces the warm-up: 100 units in 1 s; 800 left at 100 units/s
    assert eta.update(done=200, work=100, secs=1.0) == pytest.approx(8.0)
    # EMAs: work 100 + 0.5 (100 - 100) = 100, secs 1 + 0.5 (3 - 1) = 2 -> 50 units/s; 700 left
    assert eta.update(done=300, work=100, secs=3.0) == pytest.approx(14.0)
    # a bigger batch: work 100 + 0.5 (200 - 100) = 150, secs 2 + 0.5 (2 - 2) = 2 -> 75 units/s; 500 left
    assert eta.update(done=500, work=200, secs=2.0) == pytest.approx(500 / 75)
    assert eta.update(done=1000, work=500, secs=1.0) == 0.0
    with pytest.raises(ValueError, match="eta_smoothing"):
        metrics_log.Eta(total=1, smoothing=0.0)
    assert [metrics_log.fmt_duration(s) for s in (42, 725, 18420, 73 * 86400 + 4 * 3600 + 59, float("inf"))] == \
        ["42s", "12m05s", "5h07m", "73d04h", "?"]


def test_scalars_group_tags_and_expand_layers():
    rec = {"step": 3, "loss": 2.5, "lm_loss": 2.0, "lr": 1e-3, "mem_rss_gib": 1.5, "expert_imbalance": 1.2,
           "router_max_load": {"1": 1.1, "2": 1.2}, "reward": 0.5, "note": "text", "truncated": True}
    assert metrics_log.scalars(rec) == {
        "loss/loss": 2.5, "loss/lm_loss": 2.0, "optim/lr": 1e-3, "memory/mem_rss_gib": 1.5,
        "router/expert_imbalance": 1.2, "router/router_max_load/layer1": 1.1, "router/router_max_load/layer2": 1.2,
        "stage/reward": 0.5, "stage/truncated": 1.0}


def test_failing_backend_warns_once_and_training_logs_on(tmp_path, capsys):
    cfg = compose_cfg("pretrain", [f"run_dir={tmp_path}", "metrics.tensorboard=false",
                                   "metrics.wandb.enabled=true", "metrics.wandb.mode=bogus"])
    log = metrics_log.MetricLog(cfg, 0, progress="tokens", total=100, start=0)
    for step in (1, 2):
        log.log({"step": step, "tokens": 10 * step, "loss": 1.0 / step}, console=f"step {step}")
    log.close()
    err = capsys.readouterr().err
    assert err.count("[metrics] WARNING: wandb could not start") == 1, err
    assert "metrics.wandb.mode=bogus" in err
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all("eta_s" in r and "mem_rss_gib" in r for r in recs)


def console_lines(run_dir, capsys, *overrides: str) -> list[str]:
    """Steps 1-5 of a 50-token stage (10 tokens a step) through MetricLog: the console lines shown."""
    cfg = compose_cfg("pretrain", [f"run_dir={run_dir}", "metrics.tensorboard=false", *overrides])
    log = metrics_log.MetricLog(cfg, 0, progress="tokens", total=50, start=0)
    for step in range(1, 6):
        log.log({"step": step, "tokens": 10 * step, "loss": 1.0}, console=f"[t] step {step}")
    log.close()
    return [x.split(" |")[0] for x in capsys.readouterr().out.splitlines()]


def test_console_gets_first_last_and_interval_lines_while_jsonl_gets_every_step(tmp_path, capsys):
    shown = console_lines(tmp_path, capsys, "metrics.console_every_s=3600", "log_every=1")
    assert shown == ["[t] step 1", "[t] step 5"], shown  # the first, then the last (tokens reach the total)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    shown = console_lines(tmp_path, capsys, "metrics.console_every_s=0", "log_every=2")
    assert shown == ["[t] step 2", "[t] step 4", "[t] step 5"], shown  # log_every, and the last step off its grid


def test_metrics_off_by_default_import_neither_wandb_nor_network(tmp_path):
    code = ("import sys; from kit import metrics_log; from conftest import compose_cfg; "
            f"cfg = compose_cfg('sft', ['run_dir={tmp_path}']); "
            "log = metrics_log.MetricLog(cfg, 0, progress='step', total=2, start=0); "
            "log.log({'step': 1, 'loss': 1.0}); log.close(); "
            "print(cfg.metrics.wandb.enabled, cfg.metrics.tensorboard, 'wandb' in sys.modules)")
    # run from tests/: `python -c` puts the working directory first on sys.path (conftest's helpers)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                         check=True).stdout
    assert out.split()[-3:] == ["False", "True", "False"], out
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# Short real stage runs.
# ---------------------------------------------------------------------------------------------
class ConnectionCounter:
    """A local server W&B is pointed at (WANDB_BASE_URL): offline mode must never connect."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url, self.count = f"http://127.0.0.1:{self.sock.getsockname()[1]}", 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()


def start_stage(script: str, overrides: list[str], env: dict, nproc: int = 1) -> subprocess.Popen:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port())] if nproc > 1 else [sys.executable])
    return subprocess.Popen(launch + [f"stages/{script}.py"] + overrides, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
    return out


def assert_tensorboard_matches_jsonl(run_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tb = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    expected = {}
    for r in recs:
        for tag, v in metrics_log.scalars(r).items():
            expected.setdefault(tag, {})[r["step"]] = v
    assert set(tb) == set(expected), set(tb) ^ set(expected)
    for tag, by_step in expected.items():
        assert set(tb[tag]) == set(by_step), tag
        for step, v in by_step.items():  # TensorBoard stores float32
            assert tb[tag][step] == np.float32(v), (tag, step, tb[tag][step], v)
    return sum(len(v) for v in expected.values())


def wandb_records(run_file: Path):
    """Records of an offline W&B run file (LevelDB log format: 32 KiB blocks of crc32/len/type
    headers after a 7-byte ':W&B' file header), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    buf, pos, part, out = run_file.read_bytes(), 7, b"", []
    assert buf[:4] == b":W&B"
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        data, pos = buf[pos + 7:pos + 7 + n], pos + 7 + n
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, tiny_data):
    """pretrain_s1 on 2 ranks (FSDP2 x EP 2) with W&B offline, then SFT and RL from its initial weights."""
    runs = tmp_path_factory.mktemp("runs")
    server = ConnectionCounter()
    env = child_env(WANDB_BASE_URL=server.url)
    common = [f"paths.runs={runs}", "log_every=1", "metrics.console_every_s=0"]
    out = {"pretrain_s1": finish(start_stage("pretrain", common + [
        f"data.root={tiny_data}", "max_steps=3", "checkpoint.save_initial=true", "metrics.wandb.enabled=true",
        "metrics.wandb.name=test-offline"], env, nproc=2))}
    init = runs / "tiny" / "pretrain_s1" / "initial"
    sft = start_stage("sft", common + ["max_steps=2", f"stage.init_from={init}"], env)
    rl = start_stage("rl_train", common + [  # side by side with SFT: both are mostly single-threaded start-up
        "max_steps=1", f"stage.init_from={init}", "stage.rl.group_size=2", "stage.rl.groups_per_step=1",
        "stage.rl.first_round=1", "stage.rl.max_groups_tried=2", "stage.rl.max_new_tokens=8",
        "stage.rl.cache_len=2"], env)
    out["sft_instruct"], out["rl"] = finish(sft), finish(rl)
    server.sock.close()
    return runs / "tiny", out, server


@pytest.mark.slow
def test_every_stage_writes_tensorboard_events_matching_metrics_jsonl(stage_runs):
    root, _, _ = stage_runs
    for stage in ("pretrain_s1", "sft_instruct", "rl"):
        assert assert_tensorboard_matches_jsonl(root / stage) > 10, stage


@pytest.mark.slow
def test_offline_wandb_run_holds_final_loss_and_config_without_network(stage_runs):
    root, out, server = stage_runs
    final = json.loads(next(x for x in out["pretrain_s1"].splitlines()[::-1] if x.startswith("{")))["final_loss"]
    run_files = list((root / "pretrain_s1" / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    recs = wandb_records(run_files[0])
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    assert summary["loss/loss"] == pytest.approx(final, rel=1e-12), summary
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.display_name == "test-offline" and run.project == "axk1-kit"
    assert config["model"]["name"] == "tiny" and config["stage"]["name"] == "pretrain_s1"  # the resolved Hydra config
    assert server.count == 0  # offline: W&B never opened a connection


@pytest.mark.slow
def test_pretrain_console_shows_memory_and_eta_and_eta_replays(stage_runs):
    root, out, _ = stage_runs
    lines = [x for x in out["pretrain_s1"].splitlines() if x.startswith("[pretrain_s1] step")]
    assert len(lines) == 3 and all(re.search(r"\| rss \d+\.\d\dGiB \| \d+\.\d\ds/step \| eta \S+$", x) for x in lines), lines
    cfg = compose_cfg("pretrain")
    recs = [json.loads(x) for x in (root / "pretrain_s1" / "metrics.jsonl").read_text().splitlines()]
    eta, done = metrics_log.Eta(cfg.stage.budget.tiny.tokens, cfg.metrics.eta_smoothing), 0
    for r in recs:  # the logged ETA is the arithmetic above fed with the logged tokens and step times
        assert r["eta_s"] == pytest.approx(eta.update(r["tokens"], r["tokens"] - done, r["step_s"]))
        done = r["tokens"]
    assert all(r["mem_rss_gib"] > 0.1 and set(r["router_max_load"]) == set(r["router_zero_load"]) for r in recs)


@pytest.mark.slow
def test_make_report_writes_markdown_and_png_into_the_run(stage_runs):
    root, _, _ = stage_runs
    run = root / "pretrain_s1"
    p = subprocess.run(["make", "-s", "report", f"RUN={run}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (run / "report.md").read_text()
    assert "![curves](report.png)" in md and "| lm_loss |" in md and "| expert_imbalance |" in md
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Benchmarks" not in md  # no eval-bench run yet: no section

    # an eval-bench table of one of this run's checkpoints (its default folder) is linked from the report
    from stages import eval_bench
    row = {"benchmark": "GSM8K", "mode": "thinking", "metric": "avg@1", "score": 12.5, "ci": [0.0, 25.0],
           "status": "ok", "note": "", "settings": "stand-in", "paper": {"axk1": 90.0}, "n": 2, "k": 1, "malformed": 0.5}
    eval_bench.write_results([row, {**row, "mode": "non_thinking", "score": None, "status": "no data",
                                    "note": "expected gsm8k.jsonl"}], run / "checkpoints" / "step-00000003" / "bench", "tiny")
    assert subprocess.run(["make", "-s", "report", f"RUN={run}"], cwd=ROOT, capture_output=True).returncode == 0
    md = (run / "report.md").read_text()
    assert ("- [checkpoints/step-00000003/bench/results.md](checkpoints/step-00000003/bench/results.md): "
            "2 (benchmark, mode) rows, 1 scored, 1 without data") in md, md


def test_router_stats_per_layer_load_zero_experts_and_bias_norm():
    from kit import kv_decoding

    net = kv_decoding.build_inference_model(compose_cfg("pretrain").model)
    moes = {n: b.moe for n, b in net.layers.items() if getattr(b, "moe_enabled", False)}
    names = list(moes)
    E = moes[names[0]].tokens_per_expert_E.numel()
    with torch.no_grad():
        for k, (name, moe) in enumerate(moes.items()):
            counts = torch.full((E,), 4.0)
            counts[0] = 4.0 * (k + 2)  # layer k: the busiest expert has k + 2 times the others' load...
            counts[1:1 + k] = 0.0      # ...and k experts got nothing
            moe.tokens_per_expert_E.copy_(counts)
            moe.expert_bias_E.fill_(0.5 * (k + 1))
    st = metrics_log.router_stats(net)  # no process group: one rank's counts
    for k, name in enumerate(names):
        total = 4.0 * (k + 2) + 4.0 * (E - 1 - k)
        assert st["router_max_load"][name] == pytest.approx(4.0 * (k + 2) / (total / E))
        assert st["router_zero_load"][name] == k
        assert st["router_bias_norm"][name] == pytest.approx(0.5 * (k + 1) * E ** 0.5)
    assert st["expert_imbalance"] == pytest.approx(max(st["router_max_load"].values()))
    assert st["router_zero_load_experts"] == sum(range(len(names)))


def test_cuda_memory_fields_exist_in_torchtitans_monitor():
    """The CUDA path needs a GPU; what can be checked here: the DeviceMemStats fields it reads
    exist in this torchtitan, and the console shows the reserved peak from them."""
    from torchtitan.components.metrics import DeviceMemStats

    assert set(metrics_log.CUDA_FIELDS) <= set(DeviceMemStats._fields)
    rec = dict(zip(metrics_log.CUDA_FIELDS.values(), [50.0, 61.2, 43.8, 0, 0]))
    assert metrics_log.MemoryProbe.headline(rec) == "mem 61.20GiB (44%)"
