"""Pre-training, every stage (paper 3.2): config -> model -> parallelize -> data -> loop -> checkpoint.

    torchrun --nproc_per_node 2 stages/pretrain.py stage=pretrain_s1            # tiny, CPU, FSDP2 x EP 2
    python stages/pretrain.py model=axk1_519b hardware=h200_1024 parallelism=axk1_pretrain  # the paper
    python stages/pretrain.py stage=pretrain_s1 model=axk1_519b hardware=h200_1024 parallelism=axk1_pretrain --cfg job --resolve   # prints the fully composed config, runs nothing

A stage starts from the previous stage's final checkpoint (stage.init_from) and, if killed,
resumes from its own latest checkpoint: weights, optimizer, loader position and schedules.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import data
from kit import checkpoint_tokenizer, checkpoints, config_checks, context_parallel, run_lease, training


def run(cfg: DictConfig) -> dict:
    # ---- config ------------------------------------------------------------------------
    rank, world = training.init_distributed(cfg.hardware)
    config_checks.validate(cfg, world)
    stage, budget, optim = cfg.stage, config_checks.budget(cfg), cfg.optim
    run_dir = Path(cfg.run_dir)
    lease = run_lease.take(run_dir, cfg.lease, stage.name)  # one writer per run folder, before any read or write
    training.save_resolved_config(cfg, run_dir, rank)
    torch.set_num_threads(max(1, cfg.hardware.cpus_per_task))

    # ---- the data and the starting checkpoint must speak one tokenizer (checked before building) --
    latest = checkpoints.latest_checkpoint(run_dir)
    init = None if latest is not None else checkpoints.resolve_init(cfg)
    tok_dir = checkpoint_tokenizer.tokenizer_of(latest or init, cfg.data.tokenizer_dir)
    manifest = data.stage_dir(cfg.data, stage.data_stage) / "manifest.json"
    data_tok = json.loads(manifest.read_text()).get("tokenizer_sha256") if manifest.is_file() else None
    if data_tok:
        checkpoint_tokenizer.require_hash(data_tok, f"data {manifest}", tok_dir,
                                          f"checkpoint {latest or init}" if latest or init else "data.tokenizer_dir")
    tok_dir = checkpoint_tokenizer.stage_tokenizer(run_dir, init, cfg.data.tokenizer_dir, rank)

    # ---- model + parallelize (torchtitan) ----------------------------------------------
    parts, pipe, spec, parallel_dims, flops_per_token = training.build_model_parts(
        cfg, world, bias_update_rate=stage.bias_update_rate, seed=cfg.seed)
    opts = [training.build_optimizer(part, optim, spec, parallel_dims) for part in parts]  # one per pipeline chunk
    cp_sharder = context_parallel.build(parts[0], parallel_dims)  # None unless parallelism.cp > 1

    # ---- data --------------------------------------------------------------------------
    batch_mesh = parallel_dims.get_optional_mesh("batch")
    dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
    dp_size = parallel_dims.dp_replicate * parallel_dims.dp_shard
    loss_mesh = parallel_dims.get_optional_mesh("loss")  # data-parallel x context-parallel ranks
    loss_group = loss_mesh.get_group() if loss_mesh is not None else None
    loader = data.build_pretrain_loader(cfg.data, stage=stage.data_stage, seq_len=budget.seq_len,
                                        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)

    # ---- resume, or start from the previous stage ----------------------------------------
    state = {"step": 0, "samples": 0, "tokens": 0, "loss": float("nan")}
    layout = checkpoints.layout_of(cfg, world)  # recorded in checkpoints; a resume reports changes
    # the newest intact checkpoint: weights, optimizer, loader position and schedules all from it
    latest, saved = checkpoints.resume(run_dir, parts, opts, stage.name, cfg.checkpoint.checksum)
    if latest is not None:
        state = saved
        loader.load_state_dict(state["loader"])
        if rank == 0:
            print(f"[{stage.name}] resumed from {latest} at step {state['step']}", flush=True)
            for line in checkpoints.resume_changes(state.get("layout", {}), layout, state["step"] + 1):
                print(f"[{stage.name}] {line}", flush=True)
    else:
        if init is not None:
            checkpoints.load_model_weights(init, parts)
            if rank == 0:
                print(f"[{stage.name}] initialised from {init}", flush=True)
        if cfg.checkpoint.save_initial:  # a world-size-independent starting point (see conf)
            checkpoints.save_model_weights(run_dir / "initial", parts)

    # ---- loop --------------------------------------------------------------------------
    log = training.MetricLog(cfg, rank, progress="tokens", total=budget.tokens, start=state["tokens"])
    device = training.device_of(cfg.hardware)
    peak_flops = cfg.hardware.peak_tflops * 1e12 * world
    micro = cfg.parallelism.micro_batch
    steps_run, last_step_end, loss_val = 0, time.perf_counter(), state.get("loss", float("nan"))  # re-run of a finished stage
    while state["tokens"] < budget.tokens:
        if cfg.max_steps is not None and steps_run >= cfg.max_steps:
            break
        global_batch = training.global_batch_at(budget, state["samples"])
        lr = training.lr_at(stage, optim, budget, state["tokens"])
        for param_group in (group for opt in opts for group in opt.param_groups):
            param_group["lr"] = lr

        batch = loader.next_batch(global_batch)
        # Normalise by the global number of targets: torchtitan's FSDP sums gradients over ranks.
        targets = training.loss_labels(batch["labels"], batch["positions"], cfg.model.num_mtp_layers)
        if cp_sharder is not None:  # this rank's head-tail chunks of every row; targets were built on full rows
            batch, targets = cp_sharder.shard(batch, targets, cfg.model.num_mtp_layers)
        n_targets = training.global_target_counts(targets, loss_group, device)
        sums = training.train_step(parts, pipe, batch, targets, n_targets, micro=micro, cp=cp_sharder,
                                   mtp_scale=stage.mtp_scale, dp_size=dp_size, device=device)
        grad_norm, router = training.optimizer_step(parts, pipe, opts, optim.grad_clip, parallel_dims, loss_group)

        lm_loss, mtp_loss = (sums[:2] / n_targets.clamp(min=1)).tolist()
        aux_loss = float(sums[2]) / (dp_size * parallel_dims.cp)  # CP ranks each hold their rows' full aux loss
        loss_val = lm_loss + stage.mtp_scale * mtp_loss + aux_loss
        state["step"] += 1
        state["loss"] = loss_val
        state["samples"] += global_batch
        state["tokens"] += global_batch * budget.seq_len
        steps_run += 1

        now = time.perf_counter()
        tokens_per_s = global_batch * budget.seq_len / (now - last_step_end)
        last_step_end = now
        record = {
            "step": state["step"],
            "tokens": state["tokens"],
            "loss": loss_val,
            "lm_loss": lm_loss,
            "mtp_loss": mtp_loss,
            "aux_loss": aux_loss,
            "lr": lr,
            "batch": global_batch,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / peak_flops,
            "grad_norm": float(grad_norm),
            **router,
        }
        percent_done = 100.0 * state["tokens"] / budget.tokens
        log.log(record,  # the console line; MetricLog decides when it is printed (log_every, console_every_s)
                f"[{stage.name}] step {state['step']:5d} {percent_done:5.1f}% loss {loss_val:.4f} (lm {lm_loss:.4f} "
                f"mtp {mtp_loss:.4f}) lr {lr:.2e} bs {global_batch} {tokens_per_s:,.0f} tok/s "
                f"mfu {record['mfu']:.1%} imb {record['expert_imbalance']:.2f}")
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"[{stage.name}] loss is {loss_val} at step {state['step']}")

        # ---- checkpoint ------------------------------------------------------------------
        finished = state["tokens"] >= budget.tokens
        if finished or state["step"] % cfg.checkpoint.every_steps == 0:
            state["loader"], state["layout"] = loader.state_dict(), layout
            checkpoints.check_embedding_copy(pipe, stage.name)
            checkpoints.save_checkpoint(run_dir, state["step"], parts, opts, state, cfg.checkpoint.keep_last,
                                        cfg.checkpoint.checksum)
        lease.heartbeat()

    log.close()
    summary = {"stage": stage.name, "step": state["step"], "tokens": state["tokens"],
               "final_loss": loss_val, "run_dir": str(run_dir), "finished": state["tokens"] >= budget.tokens,
               "tokenizer_sha256": checkpoint_tokenizer.tokenizer_hash(tok_dir)}
    return training.finish_stage(run_dir, summary, lease)


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except checkpoint_tokenizer.TokenizerMismatch as e:
        sys.exit(f"[{cfg.stage.name}] {e}")
    training.print_summary_and_close(summary)


if __name__ == "__main__":
    main()
