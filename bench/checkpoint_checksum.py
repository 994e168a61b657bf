"""What checkpoint.checksum costs: hash throughput per core, seconds per save of the tiny model with
and without checksums, and the estimate for the 519B model on 1,536 GPUs.

  OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_checksum.py [--mib 512] [--saves 5]

The 519B figure: a checkpoint holds FP32 master weights and the two Adam moments
(optim.moment_dtype) of every parameter (cost_model.param_counts, MTP included); each rank hashes
the DCP file it wrote itself (checkpoint_manifest._share), so a save costs one rank's share at
one core's throughput, in parallel over the ranks. Its share of the checkpoint interval uses the
kit's step time model (cost_model.step_time) at checkpoint.every_steps.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from kit import checkpoint_manifest, checkpoints, config_checks, cost_model, training

CONF = str(Path(__file__).resolve().parents[1] / "conf")
BYTES = {"float32": 4, "bfloat16": 2}


def throughput(mib: int) -> dict[str, float]:
    """GB/s of each checksum over a page-cached file (what a rank reads right after its save), per
    second of this process's CPU time: on a shared machine the wall clock also counts other users."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard"
        path.write_bytes(os.urandom(mib << 20))
        out = {}
        for name, fn in checkpoint_manifest.CHECKSUMS.items():
            fn(path)  # warm the cache
            t0 = time.process_time()
            fn(path)
            out[name] = (mib << 20) / (time.process_time() - t0) / 1e9
    return out


def tiny_saves(saves: int) -> dict[str, float]:
    """Median CPU seconds of a tiny-model save without checksums, and of the manifest each checksum
    adds to it (checkpoint_manifest.write over the just-written files, as save_checkpoint runs it)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("pretrain", overrides=["parallelism=none"])
    training.init_distributed(cfg.hardware)
    parts, _, spec, pdims, _ = training.build_model_parts(cfg, 1, bias_update_rate=0.0, seed=cfg.seed)
    opts = [training.build_optimizer(parts[0], cfg.optim, spec, pdims)]
    times = {"none": [], **{name: [] for name in checkpoint_manifest.CHECKSUMS}}
    with tempfile.TemporaryDirectory() as run_dir:
        for i in range(saves):
            t0 = time.process_time()
            path = checkpoints.save_checkpoint(run_dir, i + 1, parts, opts, {"step": i + 1}, keep_last=1,
                                               checksum="none")
            times["none"].append(time.process_time() - t0)
            for name in checkpoint_manifest.CHECKSUMS:
                t0 = time.process_time()
                checkpoint_manifest.write(path, name)
                times[name].append(time.process_time() - t0)
        out = {k: statistics.median(v) for k, v in times.items()}
        out["bytes"] = sum(f.stat().st_size for f in path.iterdir())
    return out


def estimate_519b(gbps: float) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("pretrain", overrides=["model=axk1_519b", "hardware=h200_1536", "parallelism=axk1_pretrain",
                                             "stage=pretrain_s2", "optim=adamw"])
    m, b, world = cfg.model, config_checks.budget(cfg), config_checks.world_size_of(cfg)
    counts = cost_model.param_counts(m)
    n_params = counts["total_params"] + counts["mtp_params"]
    ckpt_bytes = n_params * (4 + 2 * BYTES[cfg.optim.moment_dtype])
    per_rank = ckpt_bytes / world
    hash_s = per_rank / (gbps * 1e9)
    step_s = cost_model.step_time(m, cfg.hardware, cfg.parallelism, seq_len=b.seq_len, global_batch=b.batch_end,
                                  world=world).total_s
    interval_s = cfg.checkpoint.every_steps * step_s
    return {"params": n_params, "checkpoint_TB": ckpt_bytes / 1e12, "world": world, "per_rank_GB": per_rank / 1e9,
            "hash_s_per_save": hash_s, "step_s": step_s, "every_steps": cfg.checkpoint.every_steps,
            "interval_s": interval_s, "share_of_interval": hash_s / interval_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--saves", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    gbps = throughput(a.mib)
    print("hash throughput per CPU-second, page-cached: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in gbps.items()))
    tiny = tiny_saves(a.saves)
    print(f"tiny model save ({tiny['bytes'] / 1e6:.1f} MB, one rank, median of {a.saves}, CPU s): "
          f"without checksums {tiny['none']:.3f} s; the manifest adds crc32 {tiny['crc32']:.3f} s "
          f"({tiny['crc32'] / tiny['none']:.1%}), blake2b {tiny['blake2b']:.3f} s ({tiny['blake2b'] / tiny['none']:.1%})")
    est = estimate_519b(gbps["crc32"])
    print(f"519B estimate (crc32): {est['params'] / 1e9:.0f}B params -> {est['checkpoint_TB']:.2f} TB per checkpoint, "
          f"{est['per_rank_GB']:.2f} GB per rank on {est['world']} GPUs -> {est['hash_s_per_save']:.1f} s per save; "
          f"checkpoint every {est['every_steps']} steps x {est['step_s']:.1f} s = {est['interval_s']:.0f} s -> "
          f"{est['share_of_interval']:.1%} of the interval")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
