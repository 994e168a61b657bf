"""Plumbing shared by every training stage: distributed start-up, model build + torchtitan
parallelize, optimizer, schedules, losses and metric logging (DCP checkpoints: checkpoints.py).

Stage scripts in stages/ read top to bottom and call into this module; nothing here knows which
stage it serves.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import FSDPModule
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.utils import clip_grad_norm_
from torchtitan.models.deepseek_v3.mtp import roll_mtp_sequence

import kernels
import model as axk1
from kit import (
    checkpoints,
    config_checks,
    cost_model,
    memory_features,
    metrics_log,
    pipeline,
)


# ----------------------------------------------------------------------------------------
# The one patch around torchtitan. torchtitan.tools.utils picks its device type at import
# as `_get_available_device_type() or "cuda"`, so on a GPU-less machine every DeviceMesh it
# builds asks for CUDA. We point it (and the modules that copied the name) at the device the
# hardware config names. tests/test_torchtitan_patch.py fails when this stops being needed
# (torchtitan learns CPU) or stops working (the names move).
# ----------------------------------------------------------------------------------------
def _patch_torchtitan_device(device: str) -> None:
    import torchtitan.distributed.parallel_dims as parallel_dims_mod
    import torchtitan.tools.utils as tt_utils

    module = getattr(torch, device)
    tt_utils.device_type, tt_utils.device_module = device, module
    parallel_dims_mod.device_type = device


def init_distributed(hw: DictConfig) -> tuple[int, int]:
    """Start torch.distributed from torchrun/Slurm env vars (or as a 1-process group)."""
    _patch_torchtitan_device(hw.device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python stages/x.py`: a world of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if hw.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(process_group_backend(hw),
                                timeout=datetime.timedelta(seconds=hw.collective_timeout_s))
    return dist.get_rank(), dist.get_world_size()


def process_group_backend(hw: DictConfig) -> str:
    """The default group's backend per device type. On GPUs the model's collectives run on the
    accelerator backend (NCCL: GPU tensors only) and the CPU-side ones (object lists, DCP's
    metadata exchange) on gloo in the same group: torch routes each call by its tensors' device."""
    return hw.backend if hw.device == "cpu" else f"cpu:gloo,{hw.device}:{hw.backend}"


def device_of(hw: DictConfig) -> torch.device:
    """The device this rank's model lives on (`hw`: a hardware config, or any config with a
    `device` field, as conf/evaluate.yaml): every tensor that meets the model or enters one of
    its collectives is put there (tests/test_device_placement.py checks it)."""
    return torch.device(hw.device, int(os.environ.get("LOCAL_RANK", 0))) if hw.device == "cuda" else torch.device(hw.device)


# ----------------------------------------------------------------------------------------
# Model: build on meta, parallelize with torchtitan, materialise, initialise.
# ----------------------------------------------------------------------------------------
def torchtitan_parallelism(cfg: DictConfig, world_size: int) -> ParallelismConfig:
    p, d = cfg.parallelism, config_checks.mesh_degrees(cfg, world_size)
    return ParallelismConfig(
        data_parallel_replicate_degree=p.dp_replicate, data_parallel_shard_degree=d["dp_shard"],
        context_parallel_degree=p.cp, tensor_parallel_degree=p.tp, pipeline_parallel_degree=p.pp,
        expert_parallel_degree=p.ep, spmd_backend=p.spmd_backend, pipeline_parallel_schedule=p.pp_schedule,
    )


def build_model(cfg: DictConfig, world_size: int, *, bias_update_rate: float, seed: int):
    """Returns (model, spec, parallel_dims, flops_per_token) for a stage that runs without
    pipeline parallel (evaluation, RL, merging); training loops use build_model_parts."""
    parts, pipe, spec, parallel_dims, flops_per_token = build_model_parts(
        cfg, world_size, bias_update_rate=bias_update_rate, seed=seed)
    if pipe is not None:
        raise config_checks.ConfigError(f"parallelism/{cfg.parallelism.name}.yaml pp={cfg.parallelism.pp}: this stage "
                                  f"runs without pipeline parallel; expected pp=1")
    return parts[0], spec, parallel_dims, flops_per_token


def build_model_parts(cfg: DictConfig, world_size: int, *, bias_update_rate: float, seed: int, meta: bool = False):
    """Returns (parts, pipeline, spec, parallel_dims, flops_per_token): this rank's model chunks
    ([the whole model] when pp=1) and the pipeline.Pipeline that steps them (None when pp=1).
    meta=True (stages/dryrun.py, on torch's fake process group): stop after parallelize, with the
    parameters left on the meta device and no check for hardware this machine lacks."""
    hw, p = cfg.hardware, cfg.parallelism
    if not meta:
        kernels.check_moe_comm_backend(p.moe_comm_backend)
        kernels.check_float8(hw.float8, hw.device)
    if hw.attention == "flex":
        kernels.set_flex_compile(hw.flex_compile)
    spec = axk1.model_registry(cfg.model, attention=hw.attention, moe_comm_backend=p.moe_comm_backend,
                               expert_gemm_dtype=hw.expert_gemm_dtype, expert_fuse_gate_up=hw.expert_fuse_gate_up,
                               bias_update_rate=bias_update_rate, ce_chunk_tokens=p.get("ce_chunk_tokens", 0))
    if hw.float8:  # meta (the dry run, no FP8 GPU here): torchao's emulation builds the same modules
        spec.model = float8_converter(hw, emulate=meta).build().convert(spec.model)
    parallelism = torchtitan_parallelism(cfg, world_size)
    dist_utils.set_spmd_backend(parallelism.spmd_backend)  # as torchtitan's Trainer does

    class _RuntimeConfig:  # the one field torchtitan's update_from_config reads off a non-Trainer config
        pass
    _RuntimeConfig.parallelism = parallelism
    # ...and the two training fields its DeepEP dispatcher sizes its per-rank token buffer from
    _RuntimeConfig.training = TrainingConfig(seq_len=config_checks.budget(cfg).seq_len, local_batch_size=p.micro_batch)
    spec.model.update_from_config(config=_RuntimeConfig())

    parallel_dims = ParallelDims.from_config(parallelism, world_size)
    parallel_dims.build_mesh()
    with torch.device("meta"):
        net = spec.model.build()
    # MFU uses the kit's one FLOPs count (perf_model: MLA at the causal context, MTP, head), the
    # same the planner and the dry run's time model use.
    flops_per_token = cost_model.train_flops_per_token(cfg.model, config_checks.budget(cfg).seq_len)

    ac = memory_features.activation_checkpoint_config(p.activation_checkpoint)
    training = TrainingConfig(mixed_precision_param=hw.param_dtype, mixed_precision_reduce=hw.reduce_dtype)
    device = torch.device("meta") if meta else device_of(hw)
    pipe = None
    if p.pp > 1:
        parts, pipe = pipeline.build_pipeline(net, spec, cfg, parallel_dims, parallelism, training, ac, device)
    else:
        parts = [spec.parallelize_fn(net, parallel_dims=parallel_dims, training=training, parallelism=parallelism,
                                     compile_config=CompileConfig(), ac_config=ac, dump_folder=cfg.run_dir)]
    if meta:
        return parts, pipe, spec, parallel_dims, flops_per_token
    for net in parts:
        if hw.backend == "gloo":
            # torchtitan sets FSDP's gradient divide factor to 1 (the loss is normalised by the
            # global token count instead), which FSDP turns into ReduceOp.PREMUL_SUM: NCCL-only.
            # Gloo gets the same arithmetic as a plain SUM.
            for mod in net.modules():
                if isinstance(mod, FSDPModule):
                    mod.set_force_sum_reduction_for_comms(True)
        net.to_empty(device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            net.init_states(buffer_device=device)
        net.train()
    if pipe is not None:
        pipe.sync_embedding_weights()
    return parts, pipe, spec, parallel_dims, flops_per_token


def build_optimizer(net: torch.nn.Module, o: DictConfig, spec, parallel_dims) -> torch.optim.Optimizer:
    opt = memory_features.build_adamw(net.parameters(), o)  # FP32 or BF16 moments (optim.moment_dtype)
    # torchtitan's aux-loss-free balancing: a pre-step hook moves each MoE layer's expert bias by
    # rate * sign(mean load - load) (the rate is AXK1MoE.load_balance_coeff; 0 freezes it).
    spec.post_optimizer_build_fn(opt, [net], parallel_dims)
    return opt


# ----------------------------------------------------------------------------------------
# Schedules: batch-size ramp in samples and the Warmup-Stable-Decay LR across stages.
# ----------------------------------------------------------------------------------------
def global_batch_at(b: DictConfig, samples_seen: int) -> int:
    """Sequences per step: batch_start, + batch_increment every ramp_samples/increments samples."""
    if b.batch_increment <= 0 or b.ramp_samples <= 0:
        return b.batch_end
    n_inc = (b.batch_end - b.batch_start) // b.batch_increment
    k = min(n_inc, int(samples_seen * n_inc // b.ramp_samples))
    return min(b.batch_end, b.batch_start + k * b.batch_increment)


def lr_at(stage: DictConfig, o: DictConfig, b: DictConfig, tokens_seen: int) -> float:
    """WSD: the stage's LR factor moves linearly from lr_start to lr_end over its token budget,
    after an optional warmup (stage 1 only) measured in samples."""
    frac = min(1.0, tokens_seen / b.tokens)
    factor = stage.lr_start + (stage.lr_end - stage.lr_start) * frac
    if b.get("warmup_samples", 0) > 0:
        factor *= min(1.0, (tokens_seen / b.seq_len + 1) / b.warmup_samples)
    return o.lr * factor


# ----------------------------------------------------------------------------------------
# Loss: LM + mtp_scale * MTP (the aux loss rides on the MoE activations, see model.py).
# ----------------------------------------------------------------------------------------
def loss_labels(labels: torch.Tensor, positions: torch.Tensor, num_mtp: int) -> list[torch.Tensor]:
    """Targets of the main head and of each MTP depth.

    MTP depth k predicts the token k steps after the main head's label, i.e. input position i
    predicts token i+1+k (depth 1: shifted by two); torchtitan's roll_mtp_sequence marks targets
    that would cross a packed-document boundary as ignored.
    """
    return [labels] + [roll_mtp_sequence(labels, shift=k, fill_value=IGNORE_INDEX, positions=positions)
                       for k in range(1, num_mtp + 1)]


def count_targets(targets: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Valid targets per head: [main, mtp (all depths)], on `device` (the model's: the count is
    all-reduced, and NCCL takes GPU tensors only)."""
    n_mtp = sum(int((t != IGNORE_INDEX).sum()) for t in targets[1:])
    return torch.tensor([float((targets[0] != IGNORE_INDEX).sum()), float(n_mtp)], device=device)


def ce_sums(preds, targets: list[torch.Tensor], head: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """Summed CE per head (torchtitan's cross_entropy_loss sums; the caller divides by the
    global target count, because torchtitan's FSDP setup sums gradients across ranks).
    With `head`, preds are final hidden states and the head computes a chunked CE itself."""
    preds = preds if isinstance(preds, list) else [preds]
    if head is not None:
        return [head(p, labels=t) for p, t in zip(preds, targets)]
    return [cross_entropy_loss(p, t) for p, t in zip(preds, targets)]


def step_loss(ce: list[torch.Tensor], n_targets: torch.Tensor, mtp_scale: float) -> torch.Tensor:
    """The loss one micro-batch backpropagates: its summed CE over the GLOBAL target count of the
    step (main head + mtp_scale x the MTP heads), so gradients summed over micro-batches, data
    ranks and pipeline stages equal the gradient of the step's mean loss."""
    loss = ce[0] / n_targets[0].clamp(min=1)
    if len(ce) > 1:
        loss = loss + mtp_scale * sum(ce[1:]) / n_targets[1].clamp(min=1)
    return loss


def train_step(parts: list[torch.nn.Module], pipe, batch: dict, targets: list[torch.Tensor],
               n_targets: torch.Tensor, *, micro: int, mtp_scale: float, dp_size: int,
               device: torch.device, cp=None) -> torch.Tensor:
    """Forward + backward of one optimizer step's local rows; the one seam every layout enters by.

    `parts` are this rank's model chunks ([net] without pipeline parallel), `pipe` the pipeline
    (pipeline.Pipeline) or None, `cp` the context_parallel.ContextParallel handle (batch and
    targets already sharded by it) or None. Rows go through in micro-batches of `micro`: a plain
    forward-backward loop, or torch.distributed.pipelining's schedule over the stages. Gradients
    are left in the parameters (the caller clips and steps). Returns [summed LM CE, summed MTP CE,
    aux loss (mean over micro-batches, summed over MoE layers)] summed over all ranks.
    """
    n_micro = max(1, batch["input_ids"].shape[0] // micro)  # fewer rows than micro: one micro-batch
    for part in parts:
        set_aux_grad_scale(part, 1.0 / (n_micro * dp_size))
    # parallelism.ce_chunk_tokens > 0: the model hands back hidden states and the head (on the
    # last pipeline stage) computes a chunked CE inside the loss (memory_features.ChunkedHead)
    head = next((part.lm_head for part in parts if getattr(part, "lm_head", None) is not None), None)
    with memory_features.head_in_loss(head) as fused:
        loss_head = head if fused else None
        if pipe is not None:
            def loss_fn(preds, tgts):  # on the last stage, once per micro-batch
                ce = ce_sums(preds, tgts, head=loss_head)
                return step_loss(ce, n_targets, mtp_scale), torch.stack([ce[0].detach(), sum(ce[1:]).detach()
                                                                          if len(ce) > 1 else ce[0].new_zeros(())])
            sums = pipe.step(batch, targets, loss_fn, n_micro=n_micro, device=device)
        else:
            # the sums stay on the device (no host sync per micro-batch) and are all-reduced there
            net, sums = parts[0], torch.zeros(3, device=device)
            for i in range(n_micro):
                rows = slice(i * micro, (i + 1) * micro)
                tokens, positions = batch["input_ids"][rows].to(device), batch["positions"][rows].to(device)
                masks = cp.masks(batch, rows, device) if cp is not None else net.get_attention_masks(positions)
                preds = net(tokens, positions, masks)
                ce = ce_sums(preds, [t[rows].to(device) for t in targets], head=loss_head)
                step_loss(ce, n_targets, mtp_scale).backward()
                mtp_ce = sum(c.detach() for c in ce[1:]) if len(ce) > 1 else ce[0].new_zeros(())
                sums += torch.stack([ce[0].detach().float(), mtp_ce.float(), aux_loss_tensor(net, device) / n_micro])
    # Every rank holds a share: its data rows (dp), its sequence chunk (cp), its stages' MoE aux
    # and, on the last stage only, the CE (pp). tp is always 1 (config_checks.errors), so the world
    # group is exactly dp x cp x pp.
    dist.all_reduce(sums)
    return sums


def global_target_counts(targets: list[torch.Tensor], loss_group, device: torch.device) -> torch.Tensor:
    """Valid targets per head summed over the data x context ranks (the loss normaliser; None: one
    data rank, and pipeline stages share targets), on the model's device."""
    n_targets = count_targets(targets, device)
    if loss_group is not None:
        dist.all_reduce(n_targets, group=loss_group)
    return n_targets


def optimizer_step(parts: list[torch.nn.Module], pipe, opts, max_norm: float, parallel_dims, loss_group):
    """Clip, read the router statistics, step and zero every chunk's optimizer; returns
    (grad_norm, router stats). The statistics come before step(): torchtitan's bias hook resets
    the expert-load counts; pipeline stages report their own layers."""
    grad_norm = clip_grad_norm(parts, pipe, max_norm, parallel_dims)
    router = metrics_log.router_stats(parts[0] if pipe is None else parts, loss_group)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grad_norm, router


def clip_grad_norm(parts: list[torch.nn.Module], pipe, max_norm: float, parallel_dims=None) -> torch.Tensor:
    """torchtitan's gradient clipping (EP-aware: expert and non-expert grads live on different meshes;
    over the PP mesh when pipelined). parallel_dims None: one process, plain parameters."""
    if pipe is not None:
        return pipe.clip_grad_norm_(max_norm)
    return clip_grad_norm_(parts[0].parameters(), max_norm, foreach=True,
                           pp_mesh=parallel_dims.get_optional_mesh("pp") if parallel_dims else None,
                           ep_enabled=bool(parallel_dims and parallel_dims.ep_enabled))


def float8_converter(hw: DictConfig, emulate: bool = False):
    """hardware.float8 -> torchtitan's Float8LinearConverter config. Paper 3.5: per-tensor
    (tensorwise) scaling, E4M3 forward / E5M2 backward (torchao's `tensorwise` recipe). The head
    and the router gate stay in high precision (DeepSeek-V3 report 3.3.1 keeps the output head
    and the MoE gating out of FP8); routed experts run torchtitan's BF16 grouped GEMM."""
    from torchtitan.components.quantization import Float8LinearConverter

    if hw.get("float8_recipe", "tensorwise") != "tensorwise":
        raise ValueError(f"hardware/{hw.name}.yaml float8_recipe={hw.float8_recipe!r}: expected tensorwise (paper 3.5)")
    return Float8LinearConverter.Config(recipe_name="tensorwise", filter_fqns=["lm_head", "router.gate"],
                                        emulate=emulate)


def set_aux_grad_scale(net: torch.nn.Module, scale: float) -> None:
    for moe in axk1.moe_layers(net):
        moe.aux_grad_scale = scale


def set_aux_token_mask(net: torch.nn.Module, valid: torch.Tensor | None) -> None:
    """[B, L] bool of the real tokens of the next forward (None: all): the sequence-wise
    balance loss leaves padding out."""
    for moe in axk1.moe_layers(net):
        moe.aux_token_mask = valid


def aux_loss_value(net: torch.nn.Module) -> float:
    vals = [m.last_aux_loss for m in axk1.moe_layers(net) if m.last_aux_loss is not None]
    return float(sum(vals)) if vals else 0.0


def aux_loss_tensor(net: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """aux_loss_value without the host sync: a 0-dim float tensor on `device`."""
    vals = [m.last_aux_loss.detach().float() for m in axk1.moe_layers(net) if m.last_aux_loss is not None]
    return sum(vals) if vals else torch.zeros((), device=device)


def expert_load_imbalance(net, group=None) -> float:
    """max/mean tokens per expert, worst MoE layer, summed over ranks (read before the optimizer
    step: torchtitan's balancing hook resets the counts). metrics_log.router_stats has the rest."""
    return metrics_log.router_stats(net, group)["expert_imbalance"]


# ----------------------------------------------------------------------------------------
# Logging: metrics_log.MetricLog (metrics.jsonl, console line, TensorBoard/W&B on rank 0).
# ----------------------------------------------------------------------------------------
MetricLog = metrics_log.MetricLog


def finish_stage(run_dir: str | Path, summary: dict, lease=None) -> dict:
    """End of a stage's loop on every rank: a finished stage gets DONE.json (what the next stage,
    `make status` and the launcher look for), then the run folder's lease is released."""
    if dist.get_rank() == 0 and summary["finished"]:
        checkpoints.write_atomic(Path(run_dir) / "DONE.json", json.dumps(summary))
    dist.barrier()
    if lease is not None:
        lease.release()
    return summary


def print_summary_and_close(summary: dict) -> None:
    """Last words of a stage script: one JSON line on rank 0 (the launcher and tests read it)."""
    if dist.get_rank() == 0:
        print(json.dumps(summary), flush=True)
    dist.destroy_process_group()


def save_resolved_config(cfg: DictConfig, run_dir: str | Path, rank: int) -> None:
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
