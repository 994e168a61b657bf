"""Supervised fine-tuning (paper 4.2-4.3): config -> model -> parallelize -> data -> loop -> checkpoint.

    python stages/sft.py stage=sft_instruct     # non-thinking data only, from the pre-trained model
    python stages/sft.py stage=sft_reasoning    # thinking data only, from the same checkpoint
    python stages/sft.py stage=mod_sft          # both modes per prompt, from the merged model
    python stages/sft.py stage=sft_instruct --cfg job --resolve   # prints the fully composed config, runs nothing

Loss is the NLL of response tokens only (chat_data.encode_chat masks the prompt and the mode tag
the user supplies). Chats are packed into fixed-length rows with positions restarting at every
chat, so the document mask keeps chats from attending to each other. Resumes like pre-training.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import data
from kit import chat_data, checkpoint_tokenizer, checkpoints, config_checks, run_lease, training

IGNORE = chat_data.IGNORE_INDEX


def pack_chats(encoded: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, seed: int) -> dict:
    """Greedy packing of (ids, labels) chats into rows: next-token inputs/targets per chat,
    positions restarting at 0 per chat (and for the padding tail)."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    rows, cur = [], ([], [], [])
    for i in order:
        ids, labels = encoded[i]
        inp, tgt, pos = ids[:-1], labels[1:], list(range(len(ids) - 1))
        if len(cur[0]) + len(inp) > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        for buf, part in zip(cur, (inp, tgt, pos)):
            buf.extend(part)
    if cur[0]:
        rows.append(cur)
    out = {k: torch.empty(len(rows), seq_len, dtype=torch.long) for k in ("input_ids", "labels", "positions")}
    for r, (inp, tgt, pos) in enumerate(rows):
        pad = seq_len - len(inp)
        out["input_ids"][r] = torch.tensor(inp + [pad_id] * pad)
        out["labels"][r] = torch.tensor(tgt + [IGNORE] * pad)
        out["positions"][r] = torch.tensor(pos + list(range(pad)))
    return out


def build_sft_data(cfg: DictConfig, tok, seq_len: int, rank: int) -> tuple[dict, dict]:
    records, report = chat_data.load_posttrain(cfg.posttrain_data, cfg.stage.dataset)
    encoded, too_long = [], 0
    for r in records:
        try:
            ids, labels = chat_data.encode_chat(tok, r["messages"], r.get("tools"))
        except ValueError as e:  # the template cannot split this chat at its prompt: a bad record
            data.note_bad(report.setdefault("encode", {}), f"unencodable: {e}", str(r.get("id")))
            continue
        if len(ids) - 1 > seq_len:
            too_long += 1  # counted and reported, never silently cut mid-response
            continue
        encoded.append((ids, labels))
    report["too_long"] = too_long
    report["chats"] = len(encoded)
    report["response_tokens"] = sum(sum(x != IGNORE for x in lab) for _, lab in encoded)
    if rank == 0:
        print(f"[{cfg.stage.name}] data: {json.dumps(report, ensure_ascii=False)}", flush=True)
    if not encoded:
        raise ValueError(f"stage/{cfg.stage.name}.yaml dataset={cfg.stage.dataset}: no usable chats")
    return pack_chats(encoded, seq_len, tok.pad_token_id, cfg.seed), report


def run(cfg: DictConfig) -> dict:
    # ---- config ------------------------------------------------------------------------
    rank, world = training.init_distributed(cfg.hardware)
    config_checks.validate(cfg, world)
    stage, budget, optim = cfg.stage, config_checks.budget(cfg), cfg.optim
    run_dir = Path(cfg.run_dir)
    lease = run_lease.take(run_dir, cfg.lease, stage.name)  # one writer per run folder, before any read or write
    training.save_resolved_config(cfg, run_dir, rank)
    torch.set_num_threads(max(1, cfg.hardware.cpus_per_task))

    # ---- model + parallelize (torchtitan) ----------------------------------------------
    parts, pipe, spec, parallel_dims, _ = training.build_model_parts(cfg, world, bias_update_rate=stage.bias_update_rate,
                                                                     seed=cfg.seed)
    opts = [training.build_optimizer(part, optim, spec, parallel_dims) for part in parts]  # one per pipeline chunk

    # ---- the tokenizer the starting checkpoint speaks (its own copy travels with it) --------
    latest = checkpoints.latest_checkpoint(run_dir)
    init = None if latest is not None else checkpoints.resolve_init(cfg)
    tok_dir = checkpoint_tokenizer.stage_tokenizer(run_dir, init, cfg.tokenizer_dir, rank)
    tok = checkpoint_tokenizer.load(tok_dir)
    if rank == 0:
        print(f"[{stage.name}] tokenizer {checkpoint_tokenizer.describe(tok_dir)}", flush=True)

    # ---- data: every rank packs the same rows, then takes its data-parallel share -----------
    rows, data_report = build_sft_data(cfg, tok, budget.seq_len, rank)
    batch_mesh = parallel_dims.get_optional_mesh("batch")
    dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
    dp_size = parallel_dims.dp_replicate * parallel_dims.dp_shard
    n_rows, batch_rows = rows["input_ids"].shape[0], budget.batch_end
    steps_per_epoch = max(1, n_rows // batch_rows)
    total_steps = int(math.ceil(budget.epochs * steps_per_epoch))

    # ---- resume, or start from the previous stage ----------------------------------------
    state = {"step": 0, "tokens": 0}
    latest, saved = checkpoints.resume(run_dir, parts, opts, stage.name, cfg.checkpoint.checksum)
    if latest is not None:
        state = saved
        if rank == 0:
            print(f"[{stage.name}] resumed from {latest} at step {state['step']}", flush=True)
    else:
        if init is None:
            raise ValueError(f"stage/{stage.name}.yaml init_from is empty: SFT starts from a checkpoint")
        checkpoints.load_model_weights(init, parts)
        if rank == 0:
            print(f"[{stage.name}] initialised from {init}", flush=True)

    # ---- loop --------------------------------------------------------------------------
    log = training.MetricLog(cfg, rank, progress="step", total=total_steps, start=state["step"])
    device = training.device_of(cfg.hardware)
    loss_mesh = parallel_dims.get_optional_mesh("loss")  # data-parallel x context-parallel ranks
    loss_group = loss_mesh.get_group() if loss_mesh is not None else None
    micro, steps_run, loss_val = cfg.parallelism.micro_batch, 0, float("nan")
    peak_lr = optim.lr * stage.lr_factor
    while state["step"] < total_steps:
        if cfg.max_steps is not None and steps_run >= cfg.max_steps:
            break
        step = state["step"]
        warmup = min(1.0, (step + 1) / max(1, budget.warmup_steps))
        lr = peak_lr * warmup * (1.0 - (1.0 - stage.lr_end_factor) * step / max(1, total_steps - 1))
        for param_group in (group for opt in opts for group in opt.param_groups):
            param_group["lr"] = lr
        # each epoch visits the rows in a seeded permutation; a step takes its slice of that order
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        row_ids = order[step_in_epoch * batch_rows:(step_in_epoch + 1) * batch_rows][dp_rank::dp_size]
        batch = {key: value[row_ids] for key, value in rows.items()}
        targets = training.loss_labels(batch["labels"], batch["positions"], cfg.model.num_mtp_layers)
        n_targets = training.global_target_counts(targets, loss_group, device)
        sums = training.train_step(parts, pipe, batch, targets, n_targets, micro=micro,
                                   mtp_scale=stage.mtp_scale, dp_size=dp_size, device=device)
        grad_norm, router = training.optimizer_step(parts, pipe, opts, optim.grad_clip, parallel_dims, loss_group)
        lm_loss, mtp_loss = (sums[:2] / n_targets.clamp(min=1)).tolist()
        loss_val = lm_loss
        state["step"] += 1
        state["tokens"] += int(n_targets[0])
        steps_run += 1
        record = {
            "step": state["step"],
            "epoch": epoch,
            "loss": lm_loss,
            "mtp_loss": mtp_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "response_tokens": int(n_targets[0]),
            **router,
        }
        log.log(record,  # the console line; MetricLog decides when it is printed (log_every, console_every_s)
                f"[{stage.name}] step {state['step']:4d}/{total_steps} loss {lm_loss:.4f} (mtp {mtp_loss:.4f}) "
                f"lr {lr:.2e} gnorm {float(grad_norm):.2f}")
        if not math.isfinite(lm_loss):
            raise FloatingPointError(f"[{stage.name}] loss is {lm_loss} at step {state['step']}")

        # ---- checkpoint ------------------------------------------------------------------
        finished = state["step"] >= total_steps
        if finished or state["step"] % cfg.checkpoint.every_steps == 0:
            checkpoints.check_embedding_copy(pipe, stage.name)
            checkpoints.save_checkpoint(run_dir, state["step"], parts, opts, state, cfg.checkpoint.keep_last,
                                        cfg.checkpoint.checksum)
        lease.heartbeat()

    log.close()
    summary = {"stage": stage.name, "step": state["step"], "total_steps": total_steps, "final_loss": loss_val,
               "run_dir": str(run_dir), "data": data_report,
               "tokenizer_sha256": checkpoint_tokenizer.tokenizer_hash(tok_dir), "finished": state["step"] >= total_steps}
    return training.finish_stage(run_dir, summary, lease)


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    training.print_summary_and_close(run(cfg))


if __name__ == "__main__":
    main()
