"""Pipeline parallel for A.X K1 (paper 3.4: PP 16 x EP 8): the stage split, the stages built by
torchtitan's pipeline_llm, the MTP embedding copy, and one step of a torch.distributed.pipelining
schedule.

    python -m kit.pipeline --model axk1_519b --stages 16     # print the 16-stage split

The split is contiguous over [embedding, layers.0 .. layers.N-1, (final norm + head + MTP)] and
minimises the worst stage's load, a stage's load being the larger of its share of the FLOPs and
its share of the parameters (compute bounds the pipeline's rate, memory what fits on a GPU).

MTP under PP, as Megatron-Core does it: the MTP layer sits on the last stage with the head and
needs the embeddings of the shifted tokens. The last stage keeps its own copy of the token
embedding (module `tok_embeddings`, the same name as the first stage's); after backward both
copies' gradients are summed over the (first, last) stage pair, so they receive the gradient of
the one shared embedding and take identical optimizer steps. Token ids reach every stage as a
kwarg. Checkpoints hold one embedding: both copies save under the same name with the same
values, and DCP writes a replicated tensor once; loading fills both from that one tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)
from torchtitan.config import CompileConfig
from torchtitan.distributed.utils import clip_grad_norm_

import model as axk1
from kit import context_parallel

HEAD = ("norm", "lm_head")  # the last stage's fixed modules; MTP layers join them


# ----------------------------------------------------------------------------------------
# The split: per-module costs from a meta-device build, then a min-max contiguous partition.
# ----------------------------------------------------------------------------------------
@dataclass
class Chunk:
    names: list[str]   # module FQNs, in order
    params: int
    flops: float       # training FLOPs per token (forward + backward)


def module_costs(m: DictConfig, seq_len: int) -> list[Chunk]:
    """[embedding, every layer, head group] with their parameters and training FLOPs per token:
    6 x active parameters per token (routed experts count top_k/num_experts) plus attention's
    12 x heads x head dims x seq_len per layer, as torchtitan's MFU estimate counts them."""
    with torch.device("meta"):
        net = axk1.build_model_config(m, attention="sdpa").build()
    attn = 12 * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * seq_len

    def cost(mod: torch.nn.Module) -> tuple[int, float]:
        total = active = 0
        for name, p in mod.named_parameters():
            total += p.numel()
            active += p.numel() * m.top_k // m.num_experts if ".routed_experts." in f".{name}" else p.numel()
        return total, 6.0 * active

    out = [Chunk(["tok_embeddings"], cost(net.tok_embeddings)[0], 0.0)]  # a lookup, no GEMM
    for i, layer in net.layers.items():
        p, f = cost(layer)
        out.append(Chunk([f"layers.{i}"], p, f + attn))
    head_p, head_f = cost(net.norm)[0] + cost(net.lm_head)[0], cost(net.lm_head)[1]
    names, p, f = list(HEAD), head_p, head_f
    for i, layer in enumerate(net.mtp_layers or []):
        lp, lf = cost(layer)
        # each MTP depth runs its block and the shared head again, and holds the embedding copy
        names.append(f"mtp_layers.{i}")
        p, f = p + lp, f + lf + attn + head_f
    if m.num_mtp_layers > 0:
        p += out[0].params
    out.append(Chunk(names, p, f))
    return out


def balanced_split(chunks: list[Chunk], n_stages: int) -> list[list[int]]:
    """Contiguous groups of chunk indices, one per stage, minimising the largest stage load
    max(FLOPs share, params share). Exact dynamic programme over (chunks, stages)."""
    n = len(chunks)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} pipeline chunks into {n_stages} stages (expected 1..{n})")
    tot_p, tot_f = sum(c.params for c in chunks), sum(c.flops for c in chunks) or 1.0

    def load(i: int, j: int) -> float:  # chunks[i:j] on one stage
        seg = chunks[i:j]
        return max(sum(c.params for c in seg) / tot_p, sum(c.flops for c in seg) / tot_f)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]  # best[s][j]: first j chunks on s stages
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], load(i, j))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    groups, j = [], n
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        groups.append(list(range(i, j)))
        j = i
    return groups[::-1]


def stage_split(m: DictConfig, n_stages: int, seq_len: int) -> list[list[str]]:
    """Module FQNs per stage (torchtitan's module_fqns_per_model_part), validated."""
    chunks = module_costs(m, seq_len)
    split = [[name for k in g for name in chunks[k].names] for g in balanced_split(chunks, n_stages)]
    validate_split(split, m)
    return split


def validate_split(split: list[list[str]], m: DictConfig) -> None:
    want = ["tok_embeddings"] + [f"layers.{i}" for i in range(m.n_layers)] + list(HEAD) + \
           [f"mtp_layers.{i}" for i in range(m.num_mtp_layers)]
    seen = [n for stage in split for n in stage]
    missing, dup = sorted(set(want) - set(seen)), sorted({n for n in seen if seen.count(n) > 1})
    if missing or dup or len(seen) != len(want):
        raise ValueError(f"pipeline split of model/{m.name}.yaml: missing {missing}, duplicated {dup}")
    if "tok_embeddings" not in split[0] or not set(HEAD) <= set(split[-1]):
        raise ValueError(f"pipeline split of model/{m.name}.yaml: the first stage must hold the "
                         f"embedding and the last the final norm, head and MTP layers")


def split_report(m: DictConfig, n_stages: int, seq_len: int) -> str:
    """One line per stage: modules, parameters and FLOPs share (what `launcher.py check` prints)."""
    chunks = module_costs(m, seq_len)
    tot_p, tot_f = sum(c.params for c in chunks), sum(c.flops for c in chunks)
    lines = [f"pipeline split of {m.name}: {m.n_layers} layers + {m.num_mtp_layers} MTP over {n_stages} stages "
             f"(seq_len {seq_len}; balanced by max(params share, FLOPs share))"]
    for s, g in enumerate(balanced_split(chunks, n_stages)):
        names = [n for k in g for n in chunks[k].names]
        layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
        extra = [n for n in names if not n.startswith("layers.")]
        if s == n_stages - 1 and m.num_mtp_layers > 0:
            extra.append("tok_embeddings (MTP copy)")
        p, f = sum(chunks[k].params for k in g), sum(chunks[k].flops for k in g)
        span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
        size = f"{p / 1e9:7.2f}B" if tot_p > 1e10 else f"{p / 1e6:7.2f}M"
        lines.append(f"  stage {s:2d}: {span:14s} {len(layers)} layers {size} params "
                     f"({p / tot_p:5.1%})  FLOPs {f / tot_f:5.1%}  {' '.join(extra)}")
    validate_split(stage_split(m, n_stages, seq_len), m)
    return "\n".join(lines)


def stages_per_rank(schedule: str) -> int:
    """1 for single-stage schedules (1F1B, GPipe), else the looped schedules' stages per rank."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle
    return 1 if issubclass(get_schedule_class(schedule), PipelineScheduleSingle) else 2


def is_v_schedule(schedule: str) -> bool:
    return get_schedule_class(schedule) in (ScheduleZBVZeroBubble, ScheduleDualPipeV)


# ----------------------------------------------------------------------------------------
# Build: torchtitan's pipeline_llm splits the meta model by our FQN lists, parallelizes each
# chunk (FSDP2/EP) and wraps it in a PipelineStage.
# ----------------------------------------------------------------------------------------
def build_pipeline(net, spec, cfg: DictConfig, parallel_dims, parallelism, training_cfg, ac_config,
                   device: torch.device) -> tuple[list[torch.nn.Module], "Pipeline"]:
    m, p = cfg.model, cfg.parallelism
    n_stages = p.pp * p.pp_stages_per_rank
    split = stage_split(m, n_stages, cfg.stage.budget[m.budget].seq_len)
    if m.num_mtp_layers > 0:
        split[-1] = split[-1] + ["tok_embeddings"]  # the MTP embedding copy (module docstring)
    parallelism = dataclasses.replace(parallelism, module_fqns_per_model_part=split,
                                      pipeline_parallel_microbatch_size=p.micro_batch)
    training_cfg = dataclasses.replace(training_cfg, local_batch_size=p.micro_batch * n_stages)
    schedule, parts, _, _ = spec.pipelining_fn(
        net, parallel_dims=parallel_dims, training=training_cfg, parallelism=parallelism,
        compile_config=CompileConfig(), ac_config=ac_config, dump_folder=cfg.run_dir, device=device,
        model_config=spec.model, parallelize_fn=spec.parallelize_fn, loss_fn=None,
    )
    # torchtitan builds one schedule for a fixed micro-batch count; the batch ramp changes that
    # count, so Pipeline builds a schedule per count over the same stages (read off this one).
    stages = list(schedule._stages) if isinstance(schedule, PipelineScheduleMulti) else [schedule._stage]
    for part, stage in zip(parts, stages):
        part.pipeline_first = stage.is_first
    return parts, Pipeline(parts, stages, p.pp_schedule, parallel_dims, mtp=m.num_mtp_layers > 0, device=device)


class Pipeline:
    """This rank's stages and one optimizer step's worth of schedule.step()."""

    def __init__(self, parts, stages, schedule: str, parallel_dims, *, mtp: bool, device: torch.device):
        self.parts, self.stages, self.parallel_dims = parts, stages, parallel_dims
        self.device = device  # the model's: every tensor this class all-reduces lives there
        self.schedule_cls = get_schedule_class(schedule)
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        self._schedules: dict[int, object] = {}
        self._loss_fn, self._records, self._aux, self._n_micro = None, [], 0.0, 1
        self._skip_loss = False
        self._inference_pending = [False] * len(parts)  # see _after_forward
        self._counts = [None] * len(parts)
        for i, part in enumerate(parts):
            part.register_forward_hook(lambda mod, args, out, i=i: self._after_forward(i))
        self.emb_group, self.first_rank = _first_last_group(parallel_dims) if mtp else (None, None)
        # the embedding this rank shares with the other end of the pipeline (None: none)
        self.shared_embedding = None
        if mtp and (self.has_first or self.has_last):
            holder = parts[0] if self.has_first else parts[-1]
            self.shared_embedding = holder.tok_embeddings.weight

    # -- the schedule ----------------------------------------------------------------------
    def _schedule(self, n_micro: int):
        if n_micro not in self._schedules:
            looped = issubclass(self.schedule_cls, PipelineScheduleMulti)
            self._schedules[n_micro] = self.schedule_cls(
                self.stages if looped else self.stages[0], n_microbatches=n_micro, loss_fn=self._call_loss,
                scale_grads=False)  # the loss is already normalised by the global target count
            # A fresh schedule first runs one forward (and the loss) to infer the shapes it sends
            # between stages; those calls are not training micro-batches.
            self._inference_pending = [True] * len(self.parts)
            self._skip_loss = self.has_last
            self._counts = [[m.tokens_per_expert_E.clone() for m in axk1.moe_layers(p)] for p in self.parts]
        return self._schedules[n_micro]

    def _after_forward(self, i: int) -> None:
        if self._inference_pending[i]:
            # undo the shape-inference forward's side effects: expert load counts (they feed the
            # router-bias update) and the logged aux loss
            self._inference_pending[i] = False
            with torch.no_grad():
                for m, c in zip(axk1.moe_layers(self.parts[i]), self._counts[i]):
                    m.tokens_per_expert_E.copy_(c)
            return
        vals = [m.last_aux_loss for m in axk1.moe_layers(self.parts[i]) if m.last_aux_loss is not None]
        self._aux += float(sum(vals)) / self._n_micro if vals else 0.0

    def _call_loss(self, preds, target):
        preds = list(preds) if isinstance(preds, (list, tuple)) else [preds]
        loss, record = self._loss_fn(preds, list(target.unbind(1)))
        if self._skip_loss:
            self._skip_loss = False
        else:
            self._records.append(record)
        return loss

    def step(self, batch: dict, targets: list[torch.Tensor], loss_fn, *, n_micro: int,
             device: torch.device) -> torch.Tensor:
        """Forward + backward of all micro-batches through the schedule. `loss_fn(preds, targets)`
        returns (loss to backpropagate, tensor [LM CE sum, MTP CE sum]). Returns this rank's
        [LM CE sum, MTP CE sum, aux loss (mean over micro-batches)]."""
        schedule = self._schedule(n_micro)
        self._loss_fn, self._records, self._aux, self._n_micro = loss_fn, [], 0.0, n_micro
        args = (batch["input_ids"].to(device),) if self.has_first else ()
        # token ids go to every stage (the last embeds the shifted ones for MTP), positions too
        # (each stage builds its attention mask); the schedule splits them into micro-batches
        kwargs = {"positions": batch["positions"].to(device), "input_ids": batch["input_ids"].to(device),
                  **context_parallel.stage_inputs(batch, device)}  # CP: mask inputs per row ({} without CP)
        target = torch.stack(targets, dim=1).to(device) if self.has_last else None
        schedule.step(*args, target=target, return_outputs=False, **kwargs)
        self.sync_embedding_grads()
        ce = torch.stack(self._records).sum(0).float() if self._records else torch.zeros(2, device=device)
        return torch.cat([ce, torch.tensor([self._aux], device=device)])

    # -- the MTP embedding copy -------------------------------------------------------------
    def sync_embedding_grads(self) -> None:
        """First + last stage: both copies get the summed gradient of the one embedding."""
        if self.shared_embedding is not None and self.shared_embedding.grad is not None:
            dist.all_reduce(_local(self.shared_embedding.grad), group=self.emb_group)

    def sync_embedding_weights(self) -> None:
        """After initialisation: the last stage's copy takes the first stage's values."""
        if self.shared_embedding is not None:
            with torch.no_grad():
                dist.broadcast(_local(self.shared_embedding), src=self.first_rank, group=self.emb_group)

    def embedding_drift(self) -> float:
        """Largest |last stage's copy - first stage's embedding| over all pipelines (0.0 when the
        copies are in sync; a collective on every rank)."""
        drift = torch.zeros((), device=self.device)
        if self.shared_embedding is not None:
            mine = _local(self.shared_embedding).detach()
            theirs = mine.clone()
            dist.broadcast(theirs, src=self.first_rank, group=self.emb_group)
            drift = (theirs - mine).abs().max().float()
        dist.all_reduce(drift, op=dist.ReduceOp.MAX)
        return float(drift)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torchtitan's clip over the PP mesh, counting the shared embedding once (first stage)."""
        copy = self.shared_embedding if (self.shared_embedding is not None and not self.has_first) else None
        params = [q for part in self.parts for q in part.parameters() if q is not copy]
        norm = clip_grad_norm_(params, max_norm, foreach=True, pp_mesh=self.parallel_dims.get_optional_mesh("pp"),
                               ep_enabled=self.parallel_dims.ep_enabled)
        if copy is not None and copy.grad is not None:
            torch.nn.utils.clip_grads_with_norm_([copy], max_norm, norm, foreach=True)
        return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _first_last_group(parallel_dims):
    """A process group per pipeline: its first- and last-stage ranks (same dp/ep coordinates).
    new_group is collective, so every rank creates every pair in the same order. Returns (this
    rank's pair group, the global rank of its first stage)."""
    mine = dist.get_process_group_ranks(parallel_dims.get_mesh("pp").get_group())
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    group = None
    for ranks in sorted({tuple(r) for r in every}):
        g = dist.new_group([ranks[0], ranks[-1]])
        if ranks == tuple(mine):
            group = g
    return group, mine[0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the pipeline split of a model")
    ap.add_argument("--model", default="axk1_519b", help="a name from conf/model/")
    ap.add_argument("--stages", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args()
    print(split_report(axk1.load_model_cfg(args.model), args.stages, args.seq_len))
