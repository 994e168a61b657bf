"""Context-parallel traffic per attention layer: the kit's MLA latent all-gather against an
all-gather of per-head K/V (what torchtitan's CP moves), computed for the 519B shapes at 16K/CP 4
and 32K/CP 8 (paper 3.4) and measured on the tiny model.

    .venv/bin/python bench/cp_traffic.py            # table; launches 2 gloo ranks for tiny

Bytes are those one attention layer sends over the network in one training step, all CP ranks of
one group together: the forward all-gather (each rank sends its L/cp tokens to cp-1 peers) plus
the backward reduce-scatter of the same size. Per token the latent is kv_lora_rank +
qk_rope_head_dim values; K/V is n_heads x (qk_nope + qk_rope + v) values.

Measured: 2 gloo ranks run one step (forward + backward, every micro-batch) of the tiny model
with parallelism=cpu_cp_ep on the tiny 16K-stand-in stage, and context_parallel.TRAFFIC counts the
bytes each rank's all-gather and reduce-scatter actually sent.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kit import config_checks  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("pretrain", overrides=overrides)


def per_token_values(m) -> tuple[int, int]:
    latent = m.kv_lora_rank + m.qk_rope_head_dim
    kv = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return latent, kv


def step_bytes(values_per_token: int, seq_len: int, rows: int, cp: int, elt: int) -> int:
    """Forward all-gather + backward reduce-scatter of one layer over one step, whole CP group:
    every rank sends its seq_len/cp tokens of every row to cp-1 peers, twice."""
    return 2 * rows * cp * (seq_len // cp) * values_per_token * elt * (cp - 1)


def worker(args) -> None:
    """One rank of the tiny measurement (run under torchrun)."""
    import torch
    import torch.distributed as dist

    import data
    from kit import context_parallel, training

    cfg = compose(["parallelism=cpu_cp_ep", f"stage={args.stage}", f"data.root={args.data_root}"])
    rank, world = training.init_distributed(cfg.hardware)
    torch.set_num_threads(1)
    b = training.configs.budget(cfg)
    net, spec, pdims, _ = training.build_model(cfg, world, bias_update_rate=cfg.stage.bias_update_rate, seed=cfg.seed)
    cp = context_parallel.build(net, pdims)
    loader = data.build_pretrain_loader(cfg.data, stage=cfg.stage.data_stage, seq_len=b.seq_len, dp_rank=0,
                                        dp_size=1, seed=cfg.seed)
    batch = loader.next_batch(b.batch_start)
    targets = training.loss_labels(batch["labels"], batch["positions"], cfg.model.num_mtp_layers)
    batch, targets = cp.shard(batch, targets, cfg.model.num_mtp_layers)
    micro = cfg.parallelism.micro_batch
    context_parallel.reset_traffic()
    for i in range(batch["input_ids"].shape[0] // micro):
        rows = slice(i * micro, (i + 1) * micro)
        preds = net(batch["input_ids"][rows], batch["positions"][rows], cp.masks(batch, rows, torch.device("cpu")))
        sum(training.ce_sums(preds, [t[rows] for t in targets])).backward()
    sent = torch.tensor([context_parallel.TRAFFIC["allgather_bytes"] + context_parallel.TRAFFIC["reduce_scatter_bytes"],
                         context_parallel.TRAFFIC["calls"]], dtype=torch.float64)
    dist.all_reduce(sent)  # the whole CP group
    n_attn = cfg.model.n_layers + cfg.model.num_mtp_layers
    if rank == 0:
        print("MEASURED " + json.dumps({"bytes_per_layer": sent[0].item() / n_attn, "rows": b.batch_start,
                                        "seq_len": b.seq_len, "cp": cfg.parallelism.cp, "layers": n_attn,
                                        "gathers": sent[1].item() / world}), flush=True)
    dist.destroy_process_group()


def measure_tiny(stage: str, data_root: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, "--worker", "--stage", stage, "--data-root", data_root]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"tiny measurement failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(next(x for x in p.stdout.splitlines() if x.startswith("MEASURED "))[9:])


def fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", default="pretrain_s3_16k", help="the tiny stage to measure on")
    ap.add_argument("--data-root", default=str(ROOT / "artifacts/data/tiny"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"{'model':<10} {'stage':<16} {'cp':>3} {'seq':>6} {'rows/step':>9} {'latent/tok':>10} {'K/V/tok':>8} "
          f"{'latent bytes':>14} {'K/V bytes':>14} {'ratio':>7}")
    # 519B: bf16 activations (hardware/h200_*.yaml param_dtype), the paper stages' layouts and batches.
    for stage, par in (("pretrain_s3_16k", "axk1_16k"), ("pretrain_s3_32k", "axk1_32k")):
        cfg = compose(["model=axk1_519b", "optim=adamw", "hardware=h200_1536", f"parallelism={par}", f"stage={stage}"])
        b, cp = cfg.stage.budget.paper, cfg.parallelism.cp
        lat, kv = per_token_values(cfg.model)
        ours, theirs = (step_bytes(v, b.seq_len, b.batch_end, cp, 2) for v in (lat, kv))
        print(f"{'axk1_519b':<10} {stage:<16} {cp:>3} {b.seq_len:>6} {b.batch_end:>9} {lat:>10} {kv:>8} "
              f"{fmt(ours):>14} {fmt(theirs):>14} {theirs / ours:>6.1f}x")
    print("  (519B: whole step, all CP groups; bf16; per sequence and layer: "
          f"{fmt(step_bytes(lat, b.seq_len, 1, cp, 2))} vs {fmt(step_bytes(kv, b.seq_len, 1, cp, 2))} at 32K)")

    # tiny: measured on 2 gloo ranks (fp32 activations), against the formula for both.
    cfg = compose(["parallelism=cpu_cp_ep", f"stage={args.stage}"])
    m = measure_tiny(args.stage, args.data_root)
    lat, kv = per_token_values(cfg.model)
    formula = step_bytes(lat, m["seq_len"], m["rows"], m["cp"], 4)
    theirs = step_bytes(kv, m["seq_len"], m["rows"], m["cp"], 4)
    print(f"{'tiny':<10} {args.stage:<16} {m['cp']:>3} {m['seq_len']:>6} {m['rows']:>9} {lat:>10} {kv:>8} "
          f"{fmt(m['bytes_per_layer']):>14} {fmt(theirs):>14} {theirs / m['bytes_per_layer']:>6.1f}x")
    print(f"  (tiny: latent bytes MEASURED by context_parallel.TRAFFIC over {m['layers']} attention layers, "
          f"formula {fmt(formula)}: {'match' if abs(formula - m['bytes_per_layer']) < 1 else 'MISMATCH'}; "
          "K/V bytes from the formula; fp32)")


if __name__ == "__main__":
    main()
