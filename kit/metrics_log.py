"""Watching a training run: the one metrics path of every training stage (pre-training, SFT, RL).

Each step a stage hands MetricLog one record. MetricLog adds what every stage shares (step time,
device memory, ETA of the stage), then on rank 0 appends it to <run_dir>/metrics.jsonl, prints the
console line and passes the numbers to torchtitan's loggers (components.metrics.TensorBoardLogger
into <run_dir>/tb, WandBLogger into <run_dir>/wandb) as the `metrics` config group asks. A logger
backend that fails warns once and is dropped: monitoring never stops training.

Router statistics (router_stats) are read where the expert counts live, before the optimizer step:
torchtitan's load-balancing hook resets the counts inside step().
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

GIB = 1024 ** 3

# TensorBoard/W&B sections (the dashboard groups charts by the part before "/"); metrics.jsonl
# keeps the plain keys. Keys not named here go under "stage/" (e.g. RL's reward and accuracy).
SECTIONS = {"loss": "loss", "lm_loss": "loss", "mtp_loss": "loss", "aux_loss": "loss",
            "lr": "optim", "grad_norm": "optim", "batch": "optim",
            "tokens": "speed", "tokens_per_s": "speed", "mfu": "speed", "step_s": "speed", "eta_s": "speed",
            "expert_imbalance": "router"}
PREFIX_SECTIONS = (("mem_", "memory"), ("router_", "router"))


def tb_tag(key: str) -> str:
    """Dashboard tag of a metrics.jsonl key, e.g. lm_loss -> loss/lm_loss, mem_rss_gib -> memory/mem_rss_gib."""
    section = SECTIONS.get(key) or next((s for p, s in PREFIX_SECTIONS if key.startswith(p)), "stage")
    return f"{section}/{key}"


def scalars(rec: dict) -> dict[str, float]:
    """The numbers of a record as dashboard scalars: per-layer dicts become one tag per layer
    (router_max_load {"3": 1.2} -> router/router_max_load/layer3); strings are skipped."""
    out = {}
    for k, v in rec.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update({f"{tb_tag(k)}/layer{i}": float(x) for i, x in v.items() if isinstance(x, (int, float))})
        elif isinstance(v, (int, float)):  # bool is an int
            out[tb_tag(k)] = float(v)
    return out


# ----------------------------------------------------------------------------------------
# ETA: units left / smoothed units per second.
# ----------------------------------------------------------------------------------------
class Eta:
    """Stage ETA from exponential moving averages of the work done per step and of the step's
    duration (their ratio is the smoothed rate; averaging per-step rates instead would overweight
    fast steps). `smoothing` is the newest step's weight. A process's first step carries its
    warm-up (allocator, caches, kernel selection), so it only stands in until the second arrives."""

    def __init__(self, total: float, smoothing: float):
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"metrics.eta_smoothing={smoothing}: expected a value in (0, 1]")
        self.total, self.a, self.steps = float(total), smoothing, 0
        self.work = self.secs = 0.0

    def update(self, done: float, work: float, secs: float) -> float:
        """One step that did `work` units in `secs` seconds, `done` units in total so far.
        Returns the seconds left: (total - done) / (EMA of work / EMA of secs)."""
        self.steps += 1
        if self.steps <= 2:  # the first step seeds the averages, the second replaces it
            self.work, self.secs = float(work), float(secs)
        else:
            self.work += self.a * (work - self.work)
            self.secs += self.a * (secs - self.secs)
        left = max(0.0, self.total - done)
        if left == 0.0:
            return 0.0
        return left * self.secs / self.work if self.work > 0 else float("inf")


def fmt_duration(secs: float) -> str:
    """73d04h, 5h07m, 12m05s, 42s."""
    if secs != secs or secs == float("inf"):
        return "?"
    s = int(round(secs))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ----------------------------------------------------------------------------------------
# Memory: peak allocated/reserved per step on CUDA (torchtitan's DeviceMemoryMonitor), RSS on CPU.
# ----------------------------------------------------------------------------------------
# torchtitan DeviceMemStats field -> our record key ("active" bytes: allocated and not yet freed)
CUDA_FIELDS = {"max_active_gib": "mem_peak_active_gib", "max_reserved_gib": "mem_peak_reserved_gib",
               "max_reserved_pct": "mem_peak_reserved_pct", "num_alloc_retries": "mem_alloc_retries",
               "num_ooms": "mem_ooms"}


class MemoryProbe:
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            from torchtitan.components.metrics import DeviceMemoryMonitor
            self.monitor = DeviceMemoryMonitor(f"cuda:{torch.cuda.current_device()}")

    def read(self) -> dict[str, float]:
        """This step's figures, the maximum over ranks (every rank calls this: a collective)."""
        if self.cuda:
            s = self.monitor.get_peak_stats()._asdict()
            self.monitor.reset_peak_stats()  # the next read is the next step's peak
            vals, keys = [s[f] for f in CUDA_FIELDS], list(CUDA_FIELDS.values())
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; whole process life
            vals, keys, dev = [rss / GIB, peak / GIB], ["mem_rss_gib", "mem_rss_peak_gib"], torch.device("cpu")
        t = torch.tensor(vals, dtype=torch.float64, device=dev)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist()))

    @staticmethod
    def headline(rec: dict) -> str:
        if "mem_peak_reserved_gib" in rec:
            return f"mem {rec['mem_peak_reserved_gib']:.2f}GiB ({rec['mem_peak_reserved_pct']:.0f}%)"
        return f"rss {rec['mem_rss_gib']:.2f}GiB"


# ----------------------------------------------------------------------------------------
# Router statistics of the MoE layers (per layer, keyed by the layer's name in net.layers).
# ----------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def router_stats(net, group=None) -> dict:
    """Expert load over this step's tokens, summed over ranks: expert_imbalance (max/mean load,
    worst layer), per layer max/mean load and the number of experts that got no token, and the
    norm of each layer's routing bias. Call on every rank before optimizer.step(). Routing is
    dropless (torchtitan's MoE never drops a token), so zero-load experts are the failure to watch.
    `net` may be a list of pipeline chunks: counts are then summed over `group` (the data ranks;
    None: one) and every rank returns the stats of all stages' layers."""
    pipelined = isinstance(net, list)
    parts = net if pipelined else [net]
    blocks = {name: blk.moe for part in parts for name, blk in part.layers.items() if getattr(blk, "moe_enabled", False)}
    out = {"expert_imbalance": 1.0}
    if blocks:
        counts = torch.stack([m.tokens_per_expert_E.to_local() if hasattr(m.tokens_per_expert_E, "to_local")
                              else m.tokens_per_expert_E for m in blocks.values()]).float()
        if dist.is_initialized() and (group is not None or not pipelined):
            dist.all_reduce(counts, group=group)
        max_load = (counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)).tolist()
        zero = (counts == 0).sum(dim=1).tolist()
        out = {"expert_imbalance": max(max_load),
               "router_zero_load_experts": int(sum(zero)),
               "router_max_load": {n: v for n, v in zip(blocks, max_load)},
               "router_zero_load": {n: int(z) for n, z in zip(blocks, zero)}}
        biases = {n: m.expert_bias_E for n, m in blocks.items() if getattr(m, "expert_bias_E", None) is not None}
        if biases:
            out["router_bias_norm"] = {n: float(_local(b).float().norm()) for n, b in biases.items()}
    if pipelined and dist.is_initialized():  # each stage holds other layers: merge them by name
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, out)
        merged = {"expert_imbalance": max(o["expert_imbalance"] for o in every)}
        for key in ("router_max_load", "router_zero_load", "router_bias_norm"):
            if any(key in o for o in every):
                merged[key] = dict(sorted((kv for o in every for kv in o.get(key, {}).items()),
                                          key=lambda kv: int(kv[0])))
        if "router_zero_load" in merged:
            merged["router_zero_load_experts"] = int(sum(merged["router_zero_load"].values()))
        out = merged
    return out


# ----------------------------------------------------------------------------------------
# Logger backends: torchtitan's, each behind a guard that warns once and drops it on failure.
# ----------------------------------------------------------------------------------------
class _Guarded:
    def __init__(self, name: str, make):
        self.name, self.impl = name, None
        try:
            self.impl = make()
        except Exception as e:  # noqa: BLE001  a dashboard must never stop training
            self._warn("could not start", e)

    def _warn(self, what: str, e: Exception) -> None:
        print(f"[metrics] WARNING: {self.name} {what} ({type(e).__name__}: {e}); training goes on without it",
              file=sys.stderr, flush=True)
        self.impl = None

    def log(self, values: dict, step: int) -> None:
        if self.impl is not None:
            try:
                self.impl.log(values, step)
            except Exception as e:  # noqa: BLE001
                self._warn("failed to log", e)

    def close(self) -> None:
        if self.impl is not None:
            try:
                self.impl.close()
            except Exception as e:  # noqa: BLE001
                self._warn("failed to close", e)


def _wandb_logger(cfg: DictConfig, run_dir: Path):
    """torchtitan's WandBLogger takes entity/project/name from the environment: set them from
    metrics.wandb. The run id lives in <run_dir>/wandb/run_id so a resumed stage (requeue after a
    kill) continues the same W&B run, while a fresh run directory starts a new one."""
    w = cfg.metrics.wandb
    if w.mode not in ("offline", "online"):
        raise ValueError(f"metrics.wandb.mode={w.mode}: expected offline or online")
    from torchtitan.components.metrics import WandBLogger

    log_dir = run_dir / "wandb"
    log_dir.mkdir(parents=True, exist_ok=True)
    id_file = log_dir / "run_id"
    if not id_file.exists():
        id_file.write_text(hashlib.sha1(f"{run_dir.resolve()}{time.time()}".encode()).hexdigest()[:12])
    env = {"WANDB_MODE": w.mode, "WANDB_PROJECT": w.project, "WANDB_TEAM": w.entity, "WANDB_RUN_NAME": w.name,
           "WANDB_RUN_ID": id_file.read_text().strip(), "WANDB_RESUME": "allow"}
    os.environ.update({k: str(v) for k, v in env.items() if v is not None})
    return WandBLogger(str(log_dir), config_dict=OmegaConf.to_container(cfg, resolve=True))


def _tensorboard_logger(run_dir: Path):
    from torchtitan.components.metrics import TensorBoardLogger
    return TensorBoardLogger(str(run_dir / "tb"))


# ----------------------------------------------------------------------------------------
# MetricLog: what the stage loops call.
# ----------------------------------------------------------------------------------------
class MetricLog:
    """One per training stage. Every rank calls log() once per step (the memory figure is the
    maximum over ranks); rank 0 writes. `progress` names the record key that counts the stage's
    work (tokens in pre-training, steps in SFT/RL), `total` its end and `start` its value when
    this process started (after a resume), for the ETA."""

    def __init__(self, cfg: DictConfig, rank: int, *, progress: str, total: float, start: float):
        self.rank, self.progress = rank, progress
        self.run_dir = Path(cfg.run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.memory = MemoryProbe(cfg.hardware.device)
        self.eta = Eta(total, cfg.metrics.eta_smoothing)
        self.backends: list[_Guarded] = []
        self.t_last, self.done_last = time.perf_counter(), float(start)
        self.log_every, self.console_every_s, self.t_console = int(cfg.log_every), float(cfg.metrics.console_every_s), None
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.metrics.tensorboard:
                self.backends.append(_Guarded("tensorboard", lambda: _tensorboard_logger(self.run_dir)))
            if cfg.metrics.wandb.enabled:
                self.backends.append(_Guarded("wandb", lambda: _wandb_logger(cfg, self.run_dir)))
            atexit.register(self.close)  # a crashed stage still flushes what it logged

    def log(self, rec: dict, console: str | None = None) -> dict:
        now = time.perf_counter()
        rec.setdefault("step_s", now - self.t_last)  # a stage may time its step itself
        self.t_last = now
        rec.update(self.memory.read())
        done = float(rec[self.progress])
        work, self.done_last = done - self.done_last, done
        rec["eta_s"] = self.eta.update(done, work, rec["step_s"])
        if self.rank != 0:
            return rec
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        for b in self.backends:
            b.log(scalars(rec), int(rec["step"]))
        # every log_every steps but at most every console_every_s seconds (the first due step always),
        # and the stage's last step whatever its number
        last = done >= self.eta.total
        due = int(rec["step"]) % self.log_every == 0 and (
            self.t_console is None or now - self.t_console >= self.console_every_s)
        if console and (due or last):
            self.t_console = now
            print(f"{console} | {self.memory.headline(rec)} | {rec['step_s']:.2f}s/step | "
                  f"eta {fmt_duration(rec['eta_s'])}", flush=True)
        return rec

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
