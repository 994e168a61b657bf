"""Config checks that run before anything is allocated or submitted.

Each rule returns one line naming the config field and what was expected; `validate()` raises
all of them at once so a user fixes a bad combination in one go. The launcher calls this before
submitting to Slurm, the stage scripts before building the model.
"""

from __future__ import annotations

import re
from math import prod

from omegaconf import DictConfig, OmegaConf

# ${same_tokens:B,S0,S}: the batch (sequences) at length S that carries as many tokens as B
# sequences of length S0 (the long-context stages keep the ~64M/75M tokens per step of 4K).
OmegaConf.register_new_resolver(
    "same_tokens", lambda b, s0, s: None if b is None else int(b) * int(s0) // int(s), replace=True)



def evaluation_folder(endpoint) -> str:
    """conf/evaluate.yaml's folder: `evaluate` for the checkpoints' table, its own folder per served
    endpoint (`evaluate_endpoint_127.0.0.1_8000`), so scoring a server never replaces that table."""
    if not endpoint:
        return "evaluate"
    return "evaluate_endpoint_" + re.sub(r"[^A-Za-z0-9.-]+", "_", re.sub(r"^\w+://", "", str(endpoint))).strip("_")


OmegaConf.register_new_resolver("evaluation_folder", evaluation_folder, replace=True)


class ConfigError(ValueError):
    pass


def budget(cfg: DictConfig) -> DictConfig:
    """The stage's token/sequence/batch budget for this model size (`model.budget`)."""
    try:
        return cfg.stage.budget[cfg.model.budget]
    except KeyError:
        raise ConfigError(f"stage/{cfg.stage.name}.yaml: no budget.{cfg.model.budget} "
                          f"(model/{cfg.model.name}.yaml sets budget={cfg.model.budget})") from None


def world_size_of(cfg: DictConfig) -> int:
    hw = cfg.hardware
    return hw.nodes * hw.procs_per_node


def batch_schedule_values(b: DictConfig) -> list[int]:
    """Every global batch size the ramp will use (sequences per step)."""
    if b.batch_increment <= 0:
        return [b.batch_end]
    return list(range(b.batch_start, b.batch_end, b.batch_increment)) + [b.batch_end]


def errors(cfg: DictConfig, world_size: int | None = None) -> list[str]:
    m, p, hw = cfg.model, cfg.parallelism, cfg.hardware
    ws = world_size if world_size is not None else world_size_of(cfg)
    out = []

    if cfg.optim.budget != m.budget:
        out.append(f"optim/{cfg.optim.name}.yaml is sized for budget {cfg.optim.budget}, but model/{m.name}.yaml "
                   f"uses budget {m.budget}: pick the matching optim config")
    # values no run can use: refused here, before a model or a data loader is built
    if not cfg.optim.lr > 0:
        out.append(f"optim/{cfg.optim.name}.yaml lr={cfg.optim.lr}: expected a positive learning rate")
    if m.top_k < 1:
        out.append(f"model/{m.name}.yaml top_k={m.top_k}: expected at least 1 routed expert per token")
    if "stage" in cfg and cfg.stage.get("lr_factor") is not None and cfg.stage.lr_factor < 0:
        out.append(f"stage/{cfg.stage.name}.yaml lr_factor={cfg.stage.lr_factor}: expected >= 0")
    if "stage" in cfg and cfg.stage.get("kind") == "rl" and cfg.stage.rl.rollout_backend not in ("local", "vllm"):
        out.append(f"stage/{cfg.stage.name}.yaml rl.rollout_backend={cfg.stage.rl.rollout_backend}: "
                   f"expected local or vllm")
    if m.vocab_size % 128:
        out.append(f"model/{m.name}.yaml vocab_size={m.vocab_size}: expected a multiple of 128 (paper 2.3)")
    if m.num_experts % m.n_group:
        out.append(f"model/{m.name}.yaml num_experts={m.num_experts}: expected a multiple of n_group={m.n_group}")
    if m.top_k > (m.num_experts // m.n_group) * m.topk_group:
        out.append(f"model/{m.name}.yaml top_k={m.top_k}: more than the experts in topk_group={m.topk_group} groups")

    # World size = dp_replicate * dp_shard * cp * tp * pp (EP borrows from dp_shard * cp).
    fixed = p.dp_replicate * p.cp * p.tp * p.pp
    dp_shard = p.dp_shard if p.dp_shard != -1 else ws // fixed if ws % fixed == 0 else 0
    if dp_shard < 1 or fixed * dp_shard != ws:
        out.append(f"parallelism/{p.name}.yaml: dp_replicate*dp_shard*cp*tp*pp = "
                   f"{p.dp_replicate}*{p.dp_shard}*{p.cp}*{p.tp}*{p.pp} does not equal world size {ws}")
        dp_shard = max(dp_shard, 1)
    if (dp_shard * p.cp) % p.ep:
        out.append(f"parallelism/{p.name}.yaml ep={p.ep}: expected to divide dp_shard*cp={dp_shard * p.cp}")
    if m.num_experts % p.ep:
        out.append(f"parallelism/{p.name}.yaml ep={p.ep}: expected to divide model.num_experts={m.num_experts}")
    if p.pp > 1:
        out += pipeline_errors(cfg)
    if p.activation_checkpoint not in ("none", "selective", "full", "paper"):
        out.append(f"parallelism/{p.name}.yaml activation_checkpoint={p.activation_checkpoint}: expected "
                   f"none|selective|full|paper")
    if not isinstance(p.get("ce_chunk_tokens", 0), int) or p.get("ce_chunk_tokens", 0) < 0:
        out.append(f"parallelism/{p.name}.yaml ce_chunk_tokens={p.ce_chunk_tokens}: expected an integer >= 0 "
                   f"(0 = plain cross-entropy)")
    if cfg.optim.get("moment_dtype", "float32") not in ("float32", "bfloat16"):
        out.append(f"optim/{cfg.optim.name}.yaml moment_dtype={cfg.optim.moment_dtype}: expected float32|bfloat16")
    if hw.float8 and hw.get("float8_recipe", "tensorwise") != "tensorwise":
        out.append(f"hardware/{hw.name}.yaml float8_recipe={hw.float8_recipe}: expected tensorwise "
                   f"(paper 3.5: per-tensor scaling)")
    if p.tp != 1:
        out.append(f"parallelism/{p.name}.yaml tp={p.tp}: A.X K1 trains without tensor parallelism (paper 3.4); expected 1")
    if hw.device == "cpu" and hw.attention == "flex":
        out.append(f"hardware/{hw.name}.yaml attention=flex: flex attention has no CPU backward; expected sdpa")
    if p.cp > 1 and hw.attention not in ("sdpa", "flex"):
        out.append(f"parallelism/{p.name}.yaml cp={p.cp}: context parallel runs with hardware.attention=sdpa or "
                   f"flex, got {hw.attention} (hardware/{hw.name}.yaml)")

    try:
        b = budget(cfg)
    except ConfigError as e:
        return out + [str(e)]
    if b.batch_start is None or b.batch_end is None:
        return out + [f"hardware/{hw.name}.yaml global_batch is null: the {m.budget} budget of "
                      f"stage/{cfg.stage.name}.yaml takes its batch from a cluster hardware config"]
    for key in ("tokens", "steps", "epochs", "warmup_samples", "warmup_steps"):
        if b.get(key) is not None and b[key] < 0:
            out.append(f"stage/{cfg.stage.name}.yaml budget.{m.budget}.{key}={b[key]}: expected >= 0")
    if b.seq_len < 1 or b.batch_end < 1 or b.batch_start < 1:
        out.append(f"stage/{cfg.stage.name}.yaml budget.{m.budget}: seq_len={b.seq_len}, batch "
                   f"{b.batch_start}->{b.batch_end}: expected positive values")
        return out
    if b.seq_len > m.max_seq_len:
        out.append(f"stage/{cfg.stage.name}.yaml seq_len={b.seq_len}: exceeds model.max_seq_len={m.max_seq_len}")
    if p.cp > 1 and b.seq_len % (2 * p.cp):
        out.append(f"stage/{cfg.stage.name}.yaml seq_len={b.seq_len}: expected a multiple of 2*cp={2 * p.cp} "
                   f"(context parallel load-balances two chunks per rank)")
    dp = p.dp_replicate * dp_shard
    rows = dp * p.micro_batch
    bad = [n for n in batch_schedule_values(b) if n % rows]
    if bad:
        hint = ""
        if b.batch_end % rows == 0:  # only the ramp's early sizes: a run that grows its cluster after the ramp
            hint = (f"; past the ramp (the paper ramped on 1,024 GPUs and grew the cluster after it, 3.3-3.4) "
                    f"continue here with stage.budget.{m.budget}.batch_start={b.batch_end}")
        out.append(f"stage/{cfg.stage.name}.yaml global batch {bad[0]} (of the ramp {b.batch_start}->{b.batch_end} "
                   f"step {b.batch_increment}): expected a multiple of dp*micro_batch={dp}*{p.micro_batch}={rows}{hint}")
    return out


def pipeline_errors(cfg: DictConfig) -> list[str]:
    """A pipeline layout the kit can build: a known schedule, its stages per rank, and a split of
    [embedding, layers, head + MTP] with at least one of them on every stage (pipeline.py)."""
    from torch.distributed.pipelining.schedules import (
        get_schedule_class,  # torch, not at import
    )

    from kit import pipeline

    p, m, out = cfg.parallelism, cfg.model, []
    try:
        get_schedule_class(p.pp_schedule)
    except ValueError:
        return [f"parallelism/{p.name}.yaml pp_schedule={p.pp_schedule}: not a torch.distributed.pipelining "
                f"schedule (expected e.g. 1F1B, GPipe, Interleaved1F1B)"]
    if pipeline.is_v_schedule(p.pp_schedule):
        out.append(f"parallelism/{p.name}.yaml pp_schedule={p.pp_schedule}: V schedules put the first and last "
                   f"stage on one rank, which the MTP embedding copy does not handle; use 1F1B or Interleaved1F1B")
    single = pipeline.stages_per_rank(p.pp_schedule) == 1
    if single and p.pp_stages_per_rank != 1:
        out.append(f"parallelism/{p.name}.yaml pp_stages_per_rank={p.pp_stages_per_rank}: pp_schedule="
                   f"{p.pp_schedule} runs one stage per rank; expected 1 (or an interleaved schedule)")
    if not single and p.pp_stages_per_rank < 2:
        out.append(f"parallelism/{p.name}.yaml pp_stages_per_rank={p.pp_stages_per_rank}: pp_schedule="
                   f"{p.pp_schedule} loops over several stages per rank; expected at least 2")
    n_stages, n_chunks = p.pp * p.pp_stages_per_rank, m.n_layers + 2
    if n_stages > n_chunks:
        out.append(f"parallelism/{p.name}.yaml pp={p.pp} x pp_stages_per_rank={p.pp_stages_per_rank}: "
                   f"{n_stages} stages for model/{m.name}.yaml's {n_chunks} pipeline chunks "
                   f"(embedding, {m.n_layers} layers, head + MTP); expected at most {n_chunks}")
    return out


def loop_errors(cfg: DictConfig) -> list[str]:
    """Layouts that validate but that this release's loops cannot run correctly. Refused at
    submission and at start, rather than training a wrong model on a thousand GPUs."""
    p, out = cfg.parallelism, []
    if p.pp > 1 and cfg.stage.get("kind") not in ("pretrain", "sft"):
        out.append(f"parallelism/{p.name}.yaml pp={p.pp}: stage/{cfg.stage.name}.yaml (kind {cfg.stage.get('kind')}) "
                   f"runs without pipeline parallel (only pretrain and sft stages step a schedule); use pp=1")
    if p.cp > 1 and cfg.stage.get("kind") != "pretrain":
        out.append(f"parallelism/{p.name}.yaml cp={p.cp}: stage/{cfg.stage.name}.yaml (kind {cfg.stage.get('kind')}) "
                   f"does not shard sequences for context parallel (only pretrain stages do); use cp=1")
    return out


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    errs = errors(cfg, world_size) + loop_errors(cfg)
    if errs:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))


def mesh_degrees(cfg: DictConfig, world_size: int) -> dict:
    p = cfg.parallelism
    fixed = p.dp_replicate * p.cp * p.tp * p.pp
    dp_shard = p.dp_shard if p.dp_shard != -1 else world_size // fixed
    return dict(dp_replicate=p.dp_replicate, dp_shard=dp_shard, cp=p.cp, tp=p.tp, pp=p.pp, ep=p.ep,
                dp=p.dp_replicate * dp_shard, world=prod([p.dp_replicate, dp_shard, p.cp, p.tp, p.pp]))
