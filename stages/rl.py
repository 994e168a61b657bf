"""On-policy RL (paper 4.4): config -> model -> parallelize -> data -> loop (rollout, reward,
GSPO update) -> checkpoint.

    python stages/rl.py                       # from runs/<model>/mod_sft

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

from kit import chat_data  # noqa: E402
from kit import checkpoints  # noqa: E402
from kit import config_checks  # noqa: E402
from kit import kv_decoding  # noqa: E402
import rl  # noqa: E402
import tokenizer as tokmod  # noqa: E402
from kit import training  # noqa: E402
from kit import vllm_engine  # noqa: E402


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


def rl_lr(o: DictConfig, stage: DictConfig, b: DictConfig, step: int) -> float:
    """optim.lr x lr_factor, warmed up linearly over the budget's warmup_steps RL steps (a fresh
    AdamW's first steps are full-size sign steps: see conf/stage/rl.yaml)."""
    return o.lr * stage.lr_factor * min(1.0, (step + 1) / max(1, b.warmup_steps))


def policy_step(net, opt, seqs, mask, old, adv, R: DictConfig, grad_clip: float, dp_size: int,
                pad_id: int, parallel_dims=None) -> dict:
    """One optimizer step on the GSPO loss of this rank's share of a minibatch."""
    # one forward per step on each rank: the balance loss's share is 1/dp like the GSPO loss's
    training.set_aux_grad_scale(net, 1.0 / dp_size)
    new = token_logprobs(net, seqs, pad_id)
    # the rollout-side tensors (reward advantages, response masks) meet the model's log-probs here
    old, mask, adv = (t.to(new.device) for t in (old, mask, adv))
    loss, st = rl.gspo_loss(new, old, mask, adv, R.eps_low, R.eps_high, R.aggregation)
    (loss / dp_size).backward()
    gnorm = training.clip_grad_norm([net], None, grad_clip, parallel_dims)  # EP-aware (two meshes under FSDP x EP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": float(gnorm), **st}


def run(cfg: DictConfig) -> dict:
    # ---- config ------------------------------------------------------------------------
    rank, world = training.init_distributed(cfg.hardware)
    config_checks.validate(cfg, world)
    stage, b, o, R = cfg.stage, config_checks.budget(cfg), cfg.optim, cfg.stage.rl
    run_dir = Path(cfg.run_dir)
    training.save_resolved_config(cfg, run_dir, rank)
    torch.set_num_threads(max(1, cfg.hardware.cpus_per_task))
    rcfg = rl.RewardConfig(correct=stage.reward.correct, incorrect=stage.reward.incorrect,
                           partial_credit=stage.reward.partial_credit, overlong_shaping=R.overlong_shaping,
                           max_len=R.max_new_tokens, cache_len=R.cache_len)

    # ---- model + parallelize (torchtitan), and the rollout backend that samples from it -----
    net, spec, pdims, _ = training.build_model(cfg, world, bias_update_rate=stage.bias_update_rate, seed=cfg.seed)
    opt = training.build_optimizer(net, o, spec, pdims)
    tok = tokmod.load_tokenizer(cfg.tokenizer_dir)
    rollouts = (vllm_engine.VLLMRollouts(cfg, run_dir / "rollout_engine", rank) if R.rollout_backend == "vllm"
                else kv_decoding.LocalRollouts(cfg.model, tok.pad_token_id, training.device_of(cfg.hardware)))

    # ---- data: prompts x each become x + <think> and x + </think> (paper 4.4) -------------
    records, report = chat_data.load_posttrain(cfg.posttrain_data, stage.dataset)
    if not records:
        raise ValueError(f"stage/{stage.name}.yaml dataset={stage.dataset}: no usable prompts ({json.dumps(report['bad'])})")
    dp_size = pdims.dp_replicate * pdims.dp_shard
    records = records[rank % dp_size::dp_size] if dp_size > 1 else records
    items = [(r, m) for r in records for m in rl.MODES]

    # ---- resume, or start from the previous stage ----------------------------------------
    state = {"step": 0, "cursor": 0}
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is not None:
        state = checkpoints.load_checkpoint(latest, net, opt)
    else:
        checkpoints.load_model_weights(checkpoints.resolve_init(cfg), net)
    if rank == 0:
        print(f"[{stage.name}] {'resumed from ' + str(latest) if latest else 'initialised from ' + str(checkpoints.resolve_init(cfg))}; "
              f"{len(records)} prompts x 2 modes; data {json.dumps(report['bad'])}", flush=True)
    stream = itertools.islice(itertools.cycle(items), state["cursor"], None)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank + state["step"])

    def sample_groups(batch):
        """One batched generation for all (prompt, mode) items of a round; returns their groups."""
        prompts = [chat_data.encode_prompt(tok, r["messages"], m) for r, m in batch]
        outs = rollouts.sample([p for p in prompts for _ in range(R.group_size)], max_new_tokens=R.max_new_tokens,
                               eos_id=tok.eos_token_id, temperature=R.temperature, generator=gen)
        groups = []
        for j, (r, m) in enumerate(batch):
            group = []
            for out in outs[j * R.group_size:(j + 1) * R.group_size]:
                body = out.tokens[:-1] if not out.truncated else out.tokens
                text = tok.decode(body, skip_special_tokens=False)
                rew = rl.reward(text, m, r["task"], len(out.tokens), rcfg)
                group.append({"prompt": prompts[j], "out": out, "mode": m, "reward": rew})
            groups.append(group)
        return groups

    # ---- loop --------------------------------------------------------------------------
    log = training.MetricLog(cfg, rank, progress="step", total=b.steps, start=state["step"])
    steps_run, t_last = 0, time.perf_counter()
    while state["step"] < b.steps:
        if cfg.max_steps is not None and steps_run >= cfg.max_steps:
            break
        lr = rl_lr(o, stage, b, state["step"])
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        rollouts.load(net)  # rollouts come from the weights of the last optimizer step
        t_sync, t0 = time.perf_counter() - t0, time.perf_counter()
        all_groups = []

        def rewards_of(g):
            all_groups.append(g)  # every sampled group, kept or dropped, for the on-policy metrics
            return [s["reward"].total for s in g]
        kept, ds = rl.collect_groups(sample_groups, stream, rewards_of, R.groups_per_step, R.max_groups_tried,
                                     dynamic=R.dynamic_sampling, first_round=R.first_round)
        state["cursor"] += ds["prompts_tried"]
        t_gen = time.perf_counter() - t0

        samples = [s for g in kept for s in g]
        if samples:
            adv = rl.group_advantages(torch.tensor([s["reward"].total for s in samples], dtype=torch.float32),
                                      R.group_size)
        # Every rank runs the same forwards (FSDP/EP collectives stay in lockstep whatever dynamic
        # sampling kept here): one no-grad forward for the old log-probs, then a fixed number of
        # minibatches; an empty one trains on a dummy row with a zero mask.
        chunks = [list(range(len(samples)))[k::R.minibatches] for k in range(R.minibatches)]
        seqs_all = [s["prompt"] + s["out"].tokens for s in samples]
        with torch.no_grad():
            old_all = token_logprobs(net, seqs_all or [[tok.pad_token_id] * 2], tok.pad_token_id)
        stats = []
        for idx in chunks:
            if idx:
                seqs = [seqs_all[i] for i in idx]
                T = max(len(x) for x in seqs) - 1
                mask = torch.zeros(len(idx), T)
                for row, i in enumerate(idx):
                    s = samples[i]
                    if not (R.overlong_filter and s["out"].truncated):
                        n_p = len(s["prompt"])
                        mask[row, n_p - 1:n_p - 1 + len(s["out"].tokens)] = 1.0  # targets = generated tokens
                old, a = old_all[idx, :T], adv[idx]
            else:  # a dummy row with a zero mask: no gradient, collectives stay in step
                seqs, mask, a, old = [[tok.pad_token_id] * 2], torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1)
            stats.append(policy_step(net, opt, seqs, mask, old, a, R, o.grad_clip, dp_size, tok.pad_token_id, pdims))

        # ---- metrics over everything sampled this step (the current policy's behaviour) ------
        flat = [s for g in all_groups for s in g]
        per_mode = {m: [s for s in flat if s["mode"] == m] for m in rl.MODES}
        rec = dict(step=state["step"] + 1, reward=sum(s["reward"].total for s in flat) / max(1, len(flat)),
                   accuracy=sum(s["reward"].accuracy for s in flat) / max(1, len(flat)),
                   lr=lr, gen_s=t_gen, sync_s=t_sync, **{k: sum(st[k] for st in stats) / len(stats) for k in ("loss", "clip_frac", "grad_norm")},
                   # the off-policy minibatches see what the previous steps did to the policy
                   drift_token=stats[-1]["token_drift"], drift_seq=stats[-1]["seq_log_ratio_abs"],
                   truncated=sum(s["out"].truncated for s in flat) / max(1, len(flat)), **ds)
        for m, ss in per_mode.items():
            if ss:
                rec[f"format_error_{m}"] = sum(not s["reward"].well_formed for s in ss) / len(ss)
                rec[f"tokens_{m}"] = sum(len(s["out"].tokens) for s in ss) / len(ss)
        state["step"] += 1
        steps_run += 1
        now = time.perf_counter()
        rec["step_s"] = now - t_last
        t_last = now
        log.log(rec, None if state["step"] % cfg.log_every else
                f"[{stage.name}] step {state['step']:3d}/{b.steps} reward {rec['reward']:+.3f} acc {rec['accuracy']:.3f} "
                f"fmt_err think {rec.get('format_error_thinking', float('nan')):.2f} "
                f"direct {rec.get('format_error_non_thinking', float('nan')):.2f} kept {ds['groups_kept']}/"
                f"{ds['prompts_tried']} loss {rec['loss']:+.4f} lr {lr:.1e} drift {rec['drift_token']:.4f} "
                f"clip {rec['clip_frac']:.2f} gen {t_gen:.1f}s step {rec['step_s']:.1f}s")
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"[{stage.name}] loss is {rec['loss']} at step {state['step']}")

        # ---- checkpoint ------------------------------------------------------------------
        finished = state["step"] >= b.steps
        if finished or state["step"] % cfg.checkpoint.every_steps == 0:
            checkpoints.save_checkpoint(run_dir, state["step"], net, opt, state, cfg.checkpoint.keep_last)

    log.close()
    rollouts.close()
    summary = {"stage": stage.name, "step": state["step"], "run_dir": str(run_dir), "finished": state["step"] >= b.steps}
    return training.finish_stage(run_dir, summary)


@hydra.main(config_path="../conf", config_name="rl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    training.print_summary_and_close(run(cfg))


if __name__ == "__main__":
    main()
