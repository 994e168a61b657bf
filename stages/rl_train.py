"""On-policy RL (paper 4.4): config -> model -> parallelize -> data -> loop (rollout, reward,
GSPO update) -> checkpoint.

    python stages/rl_train.py                       # from runs/<model>/mod_sft
    python stages/rl_train.py --cfg job --resolve   # prints the fully composed config, runs nothing

Every step: push the trainer's weights to the rollout backend (rl.rollout_backend: `local`, the
KV-cached decode copy in kv_decoding.py, or `vllm`, a vLLM engine: vllm_engine.py), sample groups for
prompts in both modes (x + <think>, x + </think>), score them (rl.reward: correctness + format +
DAPO overlong shaping), keep informative groups (DAPO dynamic sampling, refilling from further
prompts), then take `minibatches` optimizer steps on the GSPO sequence-level loss.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import rl
from kit import chat_data, checkpoint_tokenizer, checkpoints, config_checks, kv_decoding, run_lease, training, vllm_engine


def token_logprobs(net, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """[B, T-1] log-prob of each next token under `net` (right-padded; pad rows are their own
    document via positions restarting at 0, so they never mix with real tokens, and the MoE
    balance loss counts real tokens only, as SFT's packed rows do). Built on the host, used on the
    model's device."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    pos = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        pos[i, :len(s)] = torch.arange(len(s))
        pos[i, len(s):] = torch.arange(T - len(s))
        valid[i, :len(s)] = True
    device = net.tok_embeddings.weight.device
    ids, pos, valid = ids.to(device), pos.to(device), valid.to(device)
    training.set_aux_token_mask(net, valid)
    logits = net(ids, pos, net.get_attention_masks(pos))
    training.set_aux_token_mask(net, None)
    logits = logits[0] if isinstance(logits, list) else logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def rl_lr(optim: DictConfig, stage: DictConfig, budget: DictConfig, step: int) -> float:
    """optim.lr x lr_factor, warmed up linearly over the budget's warmup_steps RL steps (a fresh
    AdamW's first steps are full-size sign steps: see README 'RL step size')."""
    return optim.lr * stage.lr_factor * min(1.0, (step + 1) / max(1, budget.warmup_steps))


def policy_step(net, opt, seqs, mask, old, adv, rl_cfg: DictConfig, grad_clip: float, dp_size: int,
                pad_id: int, parallel_dims=None) -> dict:
    """One optimizer step on the GSPO loss of this rank's share of a minibatch."""
    # one forward per step on each rank: the balance loss's share is 1/dp like the GSPO loss's
    training.set_aux_grad_scale(net, 1.0 / dp_size)
    new = token_logprobs(net, seqs, pad_id)
    # the rollout-side tensors (reward advantages, response masks) meet the model's log-probs here
    old, mask, adv = (tensor.to(new.device) for tensor in (old, mask, adv))
    loss, loss_stats = rl.gspo_loss(new, old, mask, adv, rl_cfg.eps_low, rl_cfg.eps_high, rl_cfg.aggregation)
    (loss / dp_size).backward()
    grad_norm = training.clip_grad_norm([net], None, grad_clip, parallel_dims)  # EP-aware (two meshes under FSDP x EP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": float(grad_norm), **loss_stats}


def sample_groups(batch, rollouts, tok, rl_cfg: DictConfig, reward_cfg: rl.RewardConfig, generator) -> list[list[dict]]:
    """One batched generation for all (record, mode) items of a round: `group_size` samples per
    item, each decoded and scored; returns one group (a list of samples) per item."""
    prompts = [chat_data.encode_prompt(tok, record["messages"], mode, record.get("tools")) for record, mode in batch]
    outputs = rollouts.sample([prompt for prompt in prompts for _ in range(rl_cfg.group_size)],
                              max_new_tokens=rl_cfg.max_new_tokens, eos_id=tok.eos_token_id,
                              temperature=rl_cfg.temperature, generator=generator)
    groups = []
    for item, (record, mode) in enumerate(batch):
        group = []
        for output in outputs[item * rl_cfg.group_size:(item + 1) * rl_cfg.group_size]:
            body = output.tokens[:-1] if not output.truncated else output.tokens
            text = tok.decode(body, skip_special_tokens=False)
            reward = rl.reward(text, mode, record["task"], len(output.tokens), reward_cfg)
            group.append({"prompt": prompts[item], "out": output, "mode": mode, "reward": reward})
        groups.append(group)
    return groups


def group_rewards(group: list[dict], sampled: list[list[dict]]) -> list[float]:
    """The rewards dynamic sampling judges a group by; every sampled group, kept or dropped, is
    also recorded in `sampled` for the on-policy metrics."""
    sampled.append(group)
    return [sample["reward"].total for sample in group]


def minibatch_tensors(samples, indices, old_all, advantages, overlong_filter: bool, pad_id: int):
    """(sequences, target mask, old log-probs, advantages) of one minibatch; an empty minibatch is
    a dummy row with a zero mask (no gradient) so every rank runs the same forwards."""
    if not indices:
        return [[pad_id] * 2], torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1)
    seqs = [samples[i]["prompt"] + samples[i]["out"].tokens for i in indices]
    n_targets = max(len(seq) for seq in seqs) - 1
    mask = torch.zeros(len(indices), n_targets)
    for row, i in enumerate(indices):
        sample = samples[i]
        if not (overlong_filter and sample["out"].truncated):
            n_prompt = len(sample["prompt"])
            mask[row, n_prompt - 1:n_prompt - 1 + len(sample["out"].tokens)] = 1.0  # targets = generated tokens
    return seqs, mask, old_all[indices, :n_targets], advantages[indices]


def step_metrics(step: int, sampled: list[list[dict]], stats: list[dict], lr: float, gen_s: float, sync_s: float,
                 sampling_counts: dict) -> dict:
    """The metrics record of one RL step, over everything sampled (the current policy's behaviour)."""
    flat = [sample for group in sampled for sample in group]
    n = max(1, len(flat))
    record = {
        "step": step,
        "reward": sum(sample["reward"].total for sample in flat) / n,
        "accuracy": sum(sample["reward"].accuracy for sample in flat) / n,
        "lr": lr,
        "gen_s": gen_s,
        "sync_s": sync_s,
        "loss": sum(s["loss"] for s in stats) / len(stats),
        "clip_frac": sum(s["clip_frac"] for s in stats) / len(stats),
        "grad_norm": sum(s["grad_norm"] for s in stats) / len(stats),
        # the off-policy minibatches see what the previous steps did to the policy
        "drift_token": stats[-1]["token_drift"],
        "drift_seq": stats[-1]["seq_log_ratio_abs"],
        "truncated": sum(sample["out"].truncated for sample in flat) / n,
        **sampling_counts,
    }
    for mode in rl.MODES:
        of_mode = [sample for sample in flat if sample["mode"] == mode]
        if of_mode:
            record[f"format_error_{mode}"] = sum(not sample["reward"].well_formed for sample in of_mode) / len(of_mode)
            record[f"tokens_{mode}"] = sum(len(sample["out"].tokens) for sample in of_mode) / len(of_mode)
    return record


def run(cfg: DictConfig) -> dict:
    # ---- config ------------------------------------------------------------------------
    rank, world = training.init_distributed(cfg.hardware)
    config_checks.validate(cfg, world)
    stage, budget, optim, rl_cfg = cfg.stage, config_checks.budget(cfg), cfg.optim, cfg.stage.rl
    run_dir = Path(cfg.run_dir)
    lease = run_lease.take(run_dir, cfg.lease, stage.name)  # one writer per run folder, before any read or write
    training.save_resolved_config(cfg, run_dir, rank)
    torch.set_num_threads(max(1, cfg.hardware.cpus_per_task))
    reward_cfg = rl.RewardConfig(correct=stage.reward.correct, incorrect=stage.reward.incorrect,
                                 partial_credit=stage.reward.partial_credit, overlong_shaping=rl_cfg.overlong_shaping,
                                 max_len=rl_cfg.max_new_tokens, cache_len=rl_cfg.cache_len)

    # ---- model + parallelize (torchtitan), and the rollout backend that samples from it -----
    net, spec, parallel_dims, _ = training.build_model(cfg, world, bias_update_rate=stage.bias_update_rate, seed=cfg.seed)
    opt = training.build_optimizer(net, optim, spec, parallel_dims)
    latest = checkpoints.latest_checkpoint(run_dir)
    init = None if latest is not None else checkpoints.resolve_init(cfg)
    tok_dir = checkpoint_tokenizer.stage_tokenizer(run_dir, init, cfg.tokenizer_dir, rank)  # the checkpoint's own
    tok = checkpoint_tokenizer.load(tok_dir)
    rollouts = (vllm_engine.VLLMRollouts(cfg, run_dir / "rollout_engine", rank) if rl_cfg.rollout_backend == "vllm"
                else kv_decoding.LocalRollouts(cfg.model, tok.pad_token_id, training.device_of(cfg.hardware)))

    # ---- data: prompts x each become x + <think> and x + </think> (paper 4.4) -------------
    records, report = chat_data.load_posttrain(cfg.posttrain_data, stage.dataset)
    if not records:
        raise ValueError(f"stage/{stage.name}.yaml dataset={stage.dataset}: no usable prompts ({json.dumps(report['bad'])})")
    dp_size = parallel_dims.dp_replicate * parallel_dims.dp_shard
    records = records[rank % dp_size::dp_size] if dp_size > 1 else records
    items = [(record, mode) for record in records for mode in rl.MODES]

    # ---- resume, or start from the previous stage ----------------------------------------
    state = {"step": 0, "cursor": 0}
    latest, saved = checkpoints.resume(run_dir, net, opt, stage.name, cfg.checkpoint.checksum)
    if latest is not None:
        state = saved
    else:
        checkpoints.load_model_weights(init, net)
    if rank == 0:
        print(f"[{stage.name}] {'resumed from ' + str(latest) if latest else 'initialised from ' + str(init)}; "
              f"{len(records)} prompts x 2 modes; data {json.dumps(report['bad'])}", flush=True)
    stream = itertools.islice(itertools.cycle(items), state["cursor"], None)
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * rank + state["step"])

    def sample_round(batch):
        return sample_groups(batch, rollouts, tok, rl_cfg, reward_cfg, generator)

    # ---- loop --------------------------------------------------------------------------
    log = training.MetricLog(cfg, rank, progress="step", total=budget.steps, start=state["step"])
    steps_run, last_step_end = 0, time.perf_counter()
    while state["step"] < budget.steps:
        if cfg.max_steps is not None and steps_run >= cfg.max_steps:
            break
        lr = rl_lr(optim, stage, budget, state["step"])
        for param_group in opt.param_groups:
            param_group["lr"] = lr
        started = time.perf_counter()
        rollouts.load(net)  # rollouts come from the weights of the last optimizer step
        sync_s, started = time.perf_counter() - started, time.perf_counter()
        sampled = []  # every group sampled this step, kept or dropped
        kept, sampling_counts = rl.collect_groups(sample_round, stream, lambda group: group_rewards(group, sampled),
                                                  rl_cfg.groups_per_step, rl_cfg.max_groups_tried,
                                                  dynamic=rl_cfg.dynamic_sampling, first_round=rl_cfg.first_round)
        state["cursor"] += sampling_counts["prompts_tried"]
        gen_s = time.perf_counter() - started

        samples = [sample for group in kept for sample in group]
        advantages = None
        if samples:
            advantages = rl.group_advantages(torch.tensor([sample["reward"].total for sample in samples],
                                                          dtype=torch.float32), rl_cfg.group_size)
        # Every rank runs the same forwards (FSDP/EP collectives stay in lockstep whatever dynamic
        # sampling kept here): one no-grad forward for the old log-probs, then a fixed number of
        # minibatches; an empty one trains on a dummy row with a zero mask.
        minibatches = [list(range(len(samples)))[k::rl_cfg.minibatches] for k in range(rl_cfg.minibatches)]
        all_seqs = [sample["prompt"] + sample["out"].tokens for sample in samples]
        with torch.no_grad():
            old_all = token_logprobs(net, all_seqs or [[tok.pad_token_id] * 2], tok.pad_token_id)
        stats = []
        for indices in minibatches:
            seqs, mask, old, minibatch_advantages = minibatch_tensors(samples, indices, old_all, advantages,
                                                                      rl_cfg.overlong_filter, tok.pad_token_id)
            stats.append(policy_step(net, opt, seqs, mask, old, minibatch_advantages, rl_cfg, optim.grad_clip,
                                     dp_size, tok.pad_token_id, parallel_dims))

        # ---- metrics over everything sampled this step ---------------------------------------
        record = step_metrics(state["step"] + 1, sampled, stats, lr, gen_s, sync_s, sampling_counts)
        state["step"] += 1
        steps_run += 1
        now = time.perf_counter()
        record["step_s"] = now - last_step_end
        last_step_end = now
        log.log(record,  # the console line; MetricLog decides when it is printed (log_every, console_every_s)
                f"[{stage.name}] step {state['step']:3d}/{budget.steps} reward {record['reward']:+.3f} "
                f"acc {record['accuracy']:.3f} "
                f"fmt_err think {record.get('format_error_thinking', float('nan')):.2f} "
                f"direct {record.get('format_error_non_thinking', float('nan')):.2f} "
                f"kept {sampling_counts['groups_kept']}/{sampling_counts['prompts_tried']} loss {record['loss']:+.4f} "
                f"lr {lr:.1e} drift {record['drift_token']:.4f} clip {record['clip_frac']:.2f} "
                f"gen {gen_s:.1f}s step {record['step_s']:.1f}s")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"[{stage.name}] loss is {record['loss']} at step {state['step']}")

        # ---- checkpoint ------------------------------------------------------------------
        finished = state["step"] >= budget.steps
        if finished or state["step"] % cfg.checkpoint.every_steps == 0:
            checkpoints.save_checkpoint(run_dir, state["step"], net, opt, state, cfg.checkpoint.keep_last,
                                        cfg.checkpoint.checksum)
        lease.heartbeat()

    log.close()
    rollouts.close()
    summary = {"stage": stage.name, "step": state["step"], "run_dir": str(run_dir), "finished": state["step"] >= budget.steps,
               "tokenizer_sha256": checkpoint_tokenizer.tokenizer_hash(tok_dir)}
    return training.finish_stage(run_dir, summary, lease)


@hydra.main(config_path="../conf", config_name="rl_train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    training.print_summary_and_close(run(cfg))


if __name__ == "__main__":
    main()
