"""The scaling-law planner (paper 2.2, 2.3, 3.3) and the time model against paper Table 2.

    make plan                         # conf/plan.yaml: model axk1_519b on hardware h200_1024
    make plan ARGS="plan.days=60 hardware.inter_node_gbps=25"
    python stages/plan.py --cfg job --resolve   # prints the fully composed config, runs nothing

Prints two markdown tables (the plan; the time model at Table 2's layouts) and ends with one JSON
line: granularity, vocab_compute_optimal, vocab_chosen, batch_tokens, lr_peak, train_tokens, ...
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from kit import (
    config_checks,  # noqa: E402
    cost_model,  # noqa: E402
    planner,  # noqa: E402
)

TIME_PARTS = ("compute_s", "ep_s", "pp_bubble_s", "pp_p2p_s", "dp_s", "cp_s")


def table2_rows(cfg: DictConfig, splits: dict | None = None) -> list[dict]:
    """The time model at each Table 2 layout (conf/plan.yaml: table2), same model/hardware/batch.
    `splits` caches each layout's stage split (the trainer's split builds the model on meta)."""
    b = config_checks.budget(cfg)
    world = config_checks.world_size_of(cfg)
    splits = {} if splits is None else splits
    rows = []
    for row in cfg.table2:
        layout = {k: v for k, v in row.items() if k not in ("name", "paper_tflops")}
        p = OmegaConf.merge(OmegaConf.to_container(cfg.parallelism, resolve=True), layout)
        if row.name not in splits:
            splits[row.name] = cost_model.stage_fqns(cfg.model, p, b.seq_len)
        t = cost_model.step_time(cfg.model, cfg.hardware, p, seq_len=b.seq_len, global_batch=b.batch_end,
                                 world=world, stages=splits[row.name])
        rows.append({"name": row.name, "ep": p.ep, "pp": p.pp, "paper_tflops": row.paper_tflops,
                     "model_tflops": t.tflops_per_gpu, "mfu": t.mfu, "step_s": t.total_s,
                     "parts_s": {k: getattr(t, k) for k in TIME_PARTS}})
    return rows


def ranking_flip_bandwidth(cfg: DictConfig, order: list[str], splits: dict) -> float | None:
    """The smallest network bandwidth (GB/s per GPU, geometric grid 1..1000) at which the time
    model's ranking of the Table 2 layouts stops being `order`."""
    for i in range(61):
        bw = 10 ** (i / 20)
        c = OmegaConf.merge(cfg, {"hardware": {"inter_node_gbps": bw}})
        if [r["name"] for r in sorted(table2_rows(c, splits), key=lambda r: -r["model_tflops"])] != order:
            return bw
    return None


@hydra.main(config_path="../conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = planner.plan(cfg.model, cfg.plan)
    pc = cfg.plan
    print(f"## Plan: {cfg.model.name} ({pc.gpus} GPUs x {pc.days} days)\n")
    print("| quantity | value | source |\n|---|---|---|")
    print(f"| sustained FLOP/s per GPU | {out['sustained_flops_per_gpu']:.3e} | DeepSeek-V3 run: 6 N D / GPU-seconds |")
    print(f"| compute budget C | {out['compute_budget']:.3e} FLOPs | GPUs x days x FLOP/s (paper 2.2) |")
    print(f"| train tokens at {pc.active_params / 1e9:.0f}B active | {out['train_tokens'] / 1e12:.2f}T | C / 6N |")
    print(f"| granularity G | {out['granularity']:g} (optimal {pc.granularity_optimal_range[0]}-"
          f"{pc.granularity_optimal_range[1]}) | 2 d_model / d_expert (Tian et al. 2025) |")
    print(f"| non-vocabulary active params | {out['non_vocab_params'] / 1e9:.2f}B | model shapes |")
    print(f"| vocab, compute-optimal | {out['vocab_compute_optimal']:,.0f} (paper: ~132,500) | "
          f"dC/dV = 0 (Tao et al. 2024) |")
    print(f"| vocab, +{pc.vocab.raise_fraction:.0%} | {out['vocab_raised']:,.0f} | paper 2.3 |")
    print(f"| vocab chosen | {out['vocab_chosen']:,} (model: {cfg.model.vocab_size:,}) | "
          f"rounded to {pc.vocab.round_to:,} |")
    print(f"| peak LR | {out['lr_peak']:.3e} (optim: {cfg.optim.lr:g}) | "
          f"{pc.lr_law.coef} C^{pc.lr_law.exp} (Tian et al. 2025) |")
    print(f"| batch | {out['batch_tokens'] / 1e6:.1f}M tokens = {out['batch_sequences']:,.0f} x {pc.seq_len} "
          f"(paper: ~54M) | {pc.batch_law.coef} C^{pc.batch_law.exp} (Tian et al. 2025) |")

    hw = cfg.hardware
    splits = {}
    rows = table2_rows(cfg, splits)
    print(f"\n## Time model vs paper Table 2 ({hw.name}, GEMM efficiency {hw.gemm_efficiency:g}, NVLink "
          f"{hw.nvlink_gbps:g} GB/s, network {hw.inter_node_gbps:g} GB/s per GPU)\n")
    print("| layout | paper TFLOPs/GPU | model TFLOPs/GPU | MFU | step s | compute | EP | PP bubble | PP p2p | DP | CP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        parts = " | ".join(f"{r['parts_s'][k]:.1f}" for k in TIME_PARTS)
        print(f"| {r['name']} | {r['paper_tflops']:.2f} | {r['model_tflops']:.2f} | {r['mfu']:.1%} | "
              f"{r['step_s']:.1f} | {parts} |")
    ranked = sorted(rows, key=lambda r: -r["model_tflops"])
    paper_ranked = sorted(rows, key=lambda r: -r["paper_tflops"])
    same = [r["name"] for r in ranked] == [r["name"] for r in paper_ranked]
    print(f"\nranking {'matches' if same else 'DIFFERS FROM'} the paper: " + " > ".join(r["name"] for r in ranked))
    flip = ranking_flip_bandwidth(cfg, [r["name"] for r in ranked], splits)
    print(f"the ranking holds for network bandwidths up to {flip:.0f} GB/s per GPU (all else fixed)" if flip
          else "the ranking holds for every network bandwidth from 1 to 1000 GB/s per GPU")

    keys = ("granularity", "vocab_compute_optimal", "vocab_chosen", "batch_tokens", "lr_peak", "train_tokens",
            "compute_budget", "sustained_flops_per_gpu")
    summary = {k: out[k] for k in keys}
    summary["table2"] = [{k: r[k] for k in ("name", "paper_tflops", "model_tflops", "mfu")} for r in rows]
    summary["table2_ranking_matches"] = same
    summary["table2_ranking_flips_at_gbps"] = flip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
