"""Dry run of a training layout: the memory each GPU needs and the step time, in one CPU process.

    make dryrun MODEL=axk1_519b HARDWARE=h200_1536 PARALLEL=axk1_pretrain STAGE=pretrain_s1 [ARGS=...]
    python stages/dryrun.py stage=pretrain_s1 model=axk1_519b hardware=h200_1536 parallelism=axk1_pretrain --cfg job --resolve   # prints the fully composed config, runs nothing

config -> fake world -> build each rank kind's model part -> memory plan -> time model -> report.
torch's fake process group (every collective is a no-op) gives the chosen world size in one
process; for each distinct rank kind (PP stage x EP rank x CP rank) the rank's part is built on the
meta device by training.build_model_parts, i.e. the trainer's own torchtitan parallelize + pipeline
split, and its parameter shards are read off the DTensors. Everything that is not a parameter
shard comes from formulas: activations from memory_model (Korthikanti et al. 2022's per-tensor walk,
redone for MLA + MoE), the rest documented at each part below. Prints one markdown table and ends
with one JSON line: per_gpu_bytes (the largest rank's total), its parts, fits.
"""

from __future__ import annotations

import importlib.util
import json
import time

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from kit import (
    activation_memory,  # noqa: E402
    config_checks,  # noqa: E402
    cost_model,  # noqa: E402
    pipeline,  # noqa: E402
    training,  # noqa: E402
)

GB = 1e9
FSDP_DIMS = {"fsdp", "efsdp", "dp_replicate", "dp_shard"}  # mesh dims FSDP gathers over
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PARTS = ("params", "buffers", "grads", "optimizer", "fsdp_params", "fsdp_grads", "fp8", "activations",
         "recompute", "ce_peak", "reserved")


# ----------------------------------------------------------------------------------------
# Rank kinds: one global rank per (PP stage, EP rank, CP rank), found in torchtitan's mesh order.
# ----------------------------------------------------------------------------------------
def rank_kinds(p: DictConfig, world: int) -> list[tuple[int, int]]:
    """(PP stage, global rank) to build: every stage's first rank; on the first and last stage also
    the ranks that end the first EP group and the first CP group, and the stage's last rank.
    torchtitan unflattens the world row-major with pp outermost and EP innermost over
    dp_shard x cp, so these reach the last EP and CP coordinates (all EP/CP ranks of a stage hold
    equal shapes, num_experts % ep == 0 and CP shards only activations: the corners check that;
    the table merges equal rows). A stage's first rank is also FSDP rank 0, whose shard is the
    largest when a dimension does not divide."""
    block = world // p.pp
    offsets = sorted({0, p.ep - 1, p.cp * p.tp - 1, block - 1})
    return [(s, s * block) for s in range(p.pp)] + \
        [(s, s * block + j) for s in sorted({0, p.pp - 1}) for j in offsets if j]


# ----------------------------------------------------------------------------------------
# Parameter-derived memory, read off the built part.
# ----------------------------------------------------------------------------------------
def fsdp_unsharded_numel(t: torch.Tensor) -> int:
    """Elements FSDP's all-gather materialises on this rank: the global tensor divided by the
    non-FSDP shardings (EP for routed experts)."""
    if not isinstance(t, DTensor):
        return t.numel()
    n = t.numel()
    for i, (name, pl) in enumerate(zip(t.device_mesh.mesh_dim_names, t.placements)):
        if pl.is_shard() and name not in FSDP_DIMS:
            n //= t.device_mesh.size(i)
    return n


def local_numel(t: torch.Tensor) -> int:
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def fsdp_units(parts: list[torch.nn.Module]) -> list[tuple[int, int]]:
    """(unsharded elements, of which FP8-cast Linear weights) of each FSDP unit (the parameters
    one fully_shard call manages)."""
    from torchao.float8.float8_linear import Float8Linear

    fp8_ids = {id(t) for part in parts for mod in part.modules() if isinstance(mod, Float8Linear)
               for t in mod.parameters(recurse=False)}
    units = []
    for part in parts:
        for mod in part.modules():
            if isinstance(mod, FSDPModule):
                # one unit may hold two groups (dense params on fsdp, experts on efsdp x ep)
                fps = [fp for g in mod._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params]
                n = sum(fsdp_unsharded_numel(fp.sharded_param) for fp in fps)
                n8 = sum(fsdp_unsharded_numel(fp.sharded_param) for fp in fps if id(fp.sharded_param) in fp8_ids)
                if n:
                    units.append((n, n8))
    return units


def stage_contents(parts: list[torch.nn.Module]) -> tuple[list[int], bool, int]:
    """(transformer layer indices, holds the LM head, MTP depths) of this rank's parts."""
    layers, head, mtp = [], False, 0
    for part in parts:
        if getattr(part, "layers", None) is not None:
            layers += [int(k) for k in part.layers.keys()]
        head = head or getattr(part, "lm_head", None) is not None
        mtp += len(part.mtp_layers) if getattr(part, "mtp_layers", None) is not None else 0
    return layers, head, mtp


# ----------------------------------------------------------------------------------------
# Pipeline schedule: micro-batches whose activations a rank holds at its peak.
# ----------------------------------------------------------------------------------------
def in_flight(p: DictConfig, stage: int, n_micro: int) -> float:
    """In units of "the rank's whole activation set for one micro-batch". 1F1B: stage s holds
    pp - s (its warmup forwards + 1); interleaved 1F1B with v stages per rank (torchtitan's
    warmup, as Megatron's): (v-1)*pp + 2*(pp-1-s) + 1 chunks of 1/v each; GPipe: all."""
    if p.pp == 1:
        return 1.0
    v = p.get("pp_stages_per_rank", 1) or 1
    name = p.pp_schedule
    if name == "GPipe":
        return float(n_micro)
    if name == "1F1B":
        return float(min(p.pp - stage, n_micro))
    if name in ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"):
        return min((v - 1) * p.pp + 2 * (p.pp - 1 - stage) + 1, n_micro * v) / v
    raise config_checks.ConfigError(f"parallelism/{p.name}.yaml pp_schedule={name}: the dry run has no in-flight model "
                              f"for it (expected 1F1B | Interleaved1F1B | GPipe)")


# ----------------------------------------------------------------------------------------
# One rank's memory plan.
# ----------------------------------------------------------------------------------------
def memory_plan(cfg: DictConfig, parts: list[torch.nn.Module], stage: int, n_micro: int) -> dict:
    m, hw, p = cfg.model, cfg.hardware, cfg.parallelism
    b = config_checks.budget(cfg)
    mode = p.activation_checkpoint
    if mode not in ("none", "paper", "full"):
        raise config_checks.ConfigError(f"parallelism/{p.name}.yaml activation_checkpoint={mode}: the activation formula "
                                  f"(memory_model) covers none | paper | full; torchtitan's op-level `selective` "
                                  f"has no closed form")
    act_b = DTYPE_BYTES[hw.param_dtype]
    device = "cpu" if hw.device == "cpu" else "cuda"
    n_local = sum(local_numel(t) for part in parts for t in part.parameters())
    units = fsdp_units(parts)
    sizes = [n for n, _ in units]
    out = {}
    # FSDP2 keeps the sharded parameter in its storage dtype: the FP32 master weights (paper 3.5).
    out["params"] = n_local * 4
    # buffers (RoPE tables, router biases and load counters) in their own dtypes, not sharded
    out["buffers"] = sum(local_numel(t) * t.element_size() for part in parts for t in part.buffers())
    out["grads"] = n_local * 4                         # FP32 sharded gradients (reduce_dtype)
    moment = DTYPE_BYTES[cfg.optim.get("moment_dtype", "float32")]
    out["optimizer"] = n_local * 2 * moment            # AdamW exp_avg + exp_avg_sq
    param_b, reduce_b = DTYPE_BYTES[hw.param_dtype], DTYPE_BYTES[hw.reduce_dtype]
    if p.pp > 1:
        # torchtitan turns reshard_after_forward off under PP, and the pipeline stage disables
        # gradient sync until the last micro-batch: every unit stays gathered (param dtype) and its
        # gradients accumulate unsharded in reduce_dtype (FSDPParam.unsharded_accumulated_grad).
        out["fsdp_params"] = sum(sizes) * param_b
        out["fsdp_grads"] = sum(sizes) * reduce_b
    else:
        # resharded after each use: the unit in use plus the one prefetched, and one unit's
        # gradients before their reduce-scatter
        top = sorted(sizes, reverse=True)[:2]
        out["fsdp_params"] = sum(top) * param_b
        out["fsdp_grads"] = (top[0] if top else 0) * reduce_b
    # FP8 (torchao tensorwise, Float8Linear modules; routed experts stay BF16): the E4M3 cast of a
    # unit's weights for the forward GEMM and the transposed cast for the backward, one unit at a
    # time, at 1 byte each (scales are per tensor: scalars)
    out["fp8"] = 2 * max((n8 for _, n8 in units), default=0) if hw.float8 else 0

    layers, head, mtp = stage_contents(parts)
    tokens_seq = b.seq_len // p.cp                     # a CP rank holds 1/cp of each sequence

    def layer_bytes(i: int, rmode: str) -> int:
        moe = i >= m.n_dense_layers
        n = activation_memory.activation_bytes_per_layer(m, tokens_seq, p.micro_batch, rmode, act_b, moe=moe, device=device)
        if p.cp > 1 and rmode != "full":
            # the kit's CP (context_parallel.py) all-gathers the compressed KV latent per layer
            # and up-projects it for the whole sequence: the gathered latent is kept, and without
            # recomputation also the whole sequence's K and kv up-projection output (V a view)
            rest = (b.seq_len - tokens_seq) * p.micro_batch
            n += rest * (m.kv_lora_rank + m.qk_rope_head_dim) * act_b
            if rmode == "none":
                n += rest * m.n_heads * (2 * m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * act_b
        return n

    ce_chunk = p.get("ce_chunk_tokens", 0) or 0
    per_mb = sum(layer_bytes(i, mode) for i in layers)
    if head:
        per_mb += activation_memory.head_bytes(m, tokens_seq, p.micro_batch, ce_chunk, act_b, device)
        per_mb += mtp * activation_memory.mtp_bytes(m, tokens_seq, p.micro_batch, mode, ce_chunk, act_b, device)
    out["activations"] = int(per_mb * in_flight(p, stage, n_micro))
    out["act_per_microbatch"], out["in_flight"] = per_mb, in_flight(p, stage, n_micro)
    # backward recomputes one layer at a time: its full activation set exists transiently
    out["recompute"] = max((layer_bytes(i, "none") - layer_bytes(i, mode) for i in layers), default=0)
    # CE: beyond the saved log-probabilities (in activations when not chunked), the bf16 logits and
    # their fp32 gradient exist at once; chunked: one chunk's logits, fp32 upcast and gradient
    rows = tokens_seq * p.micro_batch
    out["ce_peak"] = (min(ce_chunk, rows) * m.vocab_size * (act_b + 4 + 4) if ce_chunk > 0
                      else rows * m.vocab_size * (act_b + 4)) if head else 0
    # CUDA context, NCCL/DeepEP buffers, allocator slack (hardware config)
    out["reserved"] = int(hw.get("runtime_reserved_gb", 0) * GB)
    out["total"] = sum(out[k] for k in PARTS)
    return out


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------
@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t0 = time.perf_counter()
    m, hw, p = cfg.model, cfg.hardware, cfg.parallelism
    world = config_checks.world_size_of(cfg)
    b = config_checks.budget(cfg)
    for line in config_checks.errors(cfg, world):
        print(f"note: the trainer would refuse this config as composed: {line}")
    deg = config_checks.mesh_degrees(cfg, world)
    n_micro = b.batch_end // (deg["dp"] * p.micro_batch)
    training._patch_torchtitan_device("cpu")  # meshes of the fake world; parameters stay on meta
    if p.moe_comm_backend == "deepep" and importlib.util.find_spec("deep_ep") is None:
        # torchtitan's DeepEP dispatcher imports deep_ep when built; the parameters are the same
        print("note: deep_ep is not installed here: parts built with moe_comm_backend=standard "
              "(same parameters; DeepEP's buffers are in `reserved`)")
        p.moe_comm_backend = "standard"

    rows, seen = [], {}
    for stage, rank in rank_kinds(p, world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            try:
                parts, _, _, pdims, _ = training.build_model_parts(
                    cfg, world, bias_update_rate=cfg.stage.bias_update_rate, seed=cfg.seed, meta=True)
            except (NotImplementedError, ValueError) as e:  # torchtitan refuses the layout itself
                msg = str(e).splitlines()[0]
                raise SystemExit(f"dry run: rank {rank} (stage {stage}) cannot be built by the trainer: "
                                 f"{type(e).__name__}: {msg}") from None
            pp_rank, ep_rank, cp_rank = [pdims.get_mesh(d).get_local_rank() if pdims.get_optional_mesh(d) is not None
                                         else 0 for d in ("pp", "ep", "cp")]
            assert pp_rank == (stage if p.pp > 1 else 0), (pp_rank, stage)
            plan = memory_plan(cfg, parts, stage, n_micro)
            layers, head, mtp = stage_contents(parts)
        finally:
            dist.destroy_process_group()
        key = (stage, tuple(plan[k] for k in PARTS))
        if key in seen:  # same shapes on another EP/CP rank of this stage: one row
            seen[key]["ranks"].append((rank, ep_rank, cp_rank))
            continue
        row = {"stage": stage, "ranks": [(rank, ep_rank, cp_rank)], "layers": layers, "head": head, "mtp": mtp, **plan}
        seen[key] = row
        rows.append(row)

    cap = hw.memory_gb * GB
    unit, scale = ("GB", GB) if max(r["total"] for r in rows) > 2 * GB else ("MB", 1e6)
    print(f"## Dry run: {m.name} on {hw.name} ({world} ranks), {p.name} (PP {p.pp} x EP {p.ep} x CP {p.cp}, "
          f"dp {deg['dp']}), {cfg.stage.name}: seq {b.seq_len}, batch {b.batch_end}, micro-batches/step {n_micro}, "
          f"{p.pp_schedule}, recompute {p.activation_checkpoint}, CE chunk {p.get('ce_chunk_tokens', 0)}, "
          f"moments {cfg.optim.get('moment_dtype', 'float32')}, FP8 {hw.float8}\n")
    print(f"Per GPU, {unit}. params/grads: FP32 shards; fsdp_*: gathered parameters and accumulated gradients; "
          f"activations: per micro-batch x in flight\n")
    print("| stage | ranks (EP,CP) | layers | act/mb x in flight | " + " | ".join(PARTS) +
          f" | total {unit} | fits |")
    print("|---|---|---|---|" + "---|" * len(PARTS) + "---|---|")
    for r in rows:
        span = f"{r['layers'][0]}-{r['layers'][-1]}" if r["layers"] else "-"
        span += " +head" if r["head"] else ""
        span += f" +{r['mtp']} MTP" if r["mtp"] else ""
        ranks = " ".join(f"{g} ({e},{c})" for g, e, c in r["ranks"])
        act = f"{r['act_per_microbatch'] / scale:.2f} x {r['in_flight']:g}"
        print(f"| {r['stage']} | {ranks} | {span} | {act} | " + " | ".join(f"{r[k] / scale:.1f}" for k in PARTS) +
              f" | {r['total'] / scale:.1f} | {r['total'] <= cap} |")
    worst = max(rows, key=lambda r: r["total"])
    fits = worst["total"] <= cap

    stages = pipeline.stage_split(m, p.pp * p.pp_stages_per_rank, b.seq_len) if p.pp > 1 else None
    t = cost_model.step_time(m, hw, p, seq_len=b.seq_len, global_batch=b.batch_end, world=world, stages=stages)
    print(f"\nlargest: stage {worst['stage']} (rank {worst['ranks'][0][0]}) {worst['total'] / GB:.1f} GB of "
          f"{hw.memory_gb} GB: fits: {str(fits).lower()}")
    print(f"time model: {t.total_s:.1f} s/step (compute {t.compute_s:.1f}, EP {t.ep_s:.1f}, PP bubble "
          f"{t.pp_bubble_s:.1f}, PP p2p {t.pp_p2p_s:.1f}, DP {t.dp_s:.1f}, CP {t.cp_s:.1f}): "
          f"{t.tflops_per_gpu:.1f} TFLOPs/GPU, MFU {t.mfu:.1%}; dry run {time.perf_counter() - t0:.0f} s")
    stages_out = [{"stage": r["stage"], "ranks": [x[0] for x in r["ranks"]], "total": r["total"],
                   "params": r["params"], "layers": len(r["layers"])} for r in rows]
    print(json.dumps({"per_gpu_bytes": worst["total"], "parts": {k: worst[k] for k in PARTS},
                      "fits": fits, "capacity_bytes": cap, "largest_rank": worst["ranks"][0][0],
                      "largest_stage": worst["stage"], "world": world, "tflops_per_gpu": t.tflops_per_gpu,
                      "mfu": t.mfu, "step_s": t.total_s, "stages": stages_out}))


if __name__ == "__main__":
    main()
