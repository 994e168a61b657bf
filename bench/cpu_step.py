"""One CPU training step of the kit against transformers' reference A.X K1, side by side.

    .venv/bin/python bench/cpu_step.py                       # tok/s table
    .venv/bin/python bench/cpu_step.py --expert-gemm-dtype bfloat16 --profile

Both sides get the same shapes (vocab, hidden, layers, dense/MoE layout, experts, top-k, groups,
MLA dims), the same batch x seq tokens per step, fp32, torch.optim.AdamW (foreach) and grad-norm
clipping, and causal attention (ours: the kit's causal+document mask, one document per row).

"ours" is the kit's real step as stages/pretrain.py runs it on one process with
parallelism=none: FSDP2 over a mesh of 1, loss_labels/count_targets/all_reduce, the aux loss,
clip_grad_norm_, the expert-imbalance read and the bias-update hook. MTP: the reference has no
MTP layer, so the like-for-like row builds ours with num_mtp_layers=0; "ours+mtp" (one MTP
layer, loss LM + mtp_scale*MTP) is printed for information only. `--expert-gemm-dtype
bfloat16` adds the kit as it was before kernels.GroupedExpertsMM (torchtitan's bf16 cast).
Variants run interleaved in one process (one step each, round-robin); per-step medians are reported.
"""

from __future__ import annotations

import argparse
import os

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (one per round, round-robin)")
ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                help="libgomp's OMP_WAIT_POLICY for both sides (default PASSIVE: see the note below)")
ap.add_argument("--expert-gemm-dtype", default=None, choices=["bfloat16", "float16"],
                help="also run the kit with its routed-expert GEMMs in this dtype (the pre-fix default)")
ap.add_argument("--no-mtp", action="store_true", help="skip the informational ours+mtp variant")
ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for each variant")
ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.dim=128")
args = ap.parse_args()
# On a shared, oversubscribed CPU (other jobs running), libgomp's default spin-then-sleep barrier
# stalls each 2-thread parallel region until the preempted peer thread is rescheduled: a small
# expert GEMM then takes 20-40 ms instead of 0.3 ms, and wall time counts parallel regions, not
# work. PASSIVE waiting removes the stalls on both sides. It must be set before torch loads libgomp.
if args.omp_wait_policy != "default":
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
import statistics  # noqa: E402  (after OMP_WAIT_POLICY is set)
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torchtitan.distributed.utils import clip_grad_norm_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
import model as axk1  # noqa: E402
from kit import training  # noqa: E402

# ~8.8M parameters (no MTP): the tiny model's structure with a wider hidden size / vocab.
BENCH_MODEL = ["model.dim=256", "model.vocab_size=8192", "model.dense_hidden_dim=768", "model.moe_hidden_dim=96"]


# ---- config: conf/pretrain.yaml with the bench model, one process, one micro-batch ---------
with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
    cfg = compose("pretrain", overrides=["parallelism=none", "hardware=cpu", *BENCH_MODEL,
                                         f"parallelism.micro_batch={args.batch}", *args.overrides])
OmegaConf.set_struct(cfg, False)
m, o = cfg.model, cfg.optim
training.init_distributed(cfg.hardware)
torch.set_num_threads(args.threads)


# ---- the kit: training.build_model + the loop body of stages/pretrain.py ---------------------
def build_ours(num_mtp: int, gemm_dtype: str):
    c = cfg.copy()
    c.model.num_mtp_layers, c.hardware.expert_gemm_dtype = num_mtp, gemm_dtype
    net, spec, pdims, _ = training.build_model(c, 1, bias_update_rate=cfg.stage.bias_update_rate, seed=cfg.seed)
    opt = training.build_optimizer(net, o, spec, pdims)
    n_params = axk1.count_params(net, c.model)

    def step(tokens, labels, positions):
        targets = training.loss_labels(labels, positions, num_mtp)
        n_targets = training.count_targets(targets, torch.device("cpu"))
        dist.all_reduce(n_targets)
        training.set_aux_grad_scale(net, 1.0)
        preds = net(tokens, positions, net.get_attention_masks(positions))
        ce = training.ce_sums(preds, targets)
        loss = ce[0] / n_targets[0]
        if len(ce) > 1:
            loss = loss + cfg.stage.mtp_scale * sum(ce[1:]) / n_targets[1].clamp(min=1)
        loss.backward()
        sums = torch.tensor([ce[0].item(), sum(c.item() for c in ce[1:]), training.aux_loss_value(net)])
        clip_grad_norm_(net.parameters(), o.grad_clip, foreach=True, pp_mesh=None, ep_enabled=False)
        training.expert_load_imbalance(net)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(sums)
        return float(sums[0] / n_targets[0])

    return step, n_params


# ---- the reference: transformers' AXK1ForCausalLM on the same shapes ------------------------
def build_reference():
    from transformers.models.axk1 import AXK1Config, AXK1ForCausalLM
    rc = AXK1Config(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.dense_hidden_dim,
        moe_intermediate_size=m.moe_hidden_dim, num_hidden_layers=m.n_layers,
        mlp_layer_types=["dense" if i < m.n_dense_layers else "sparse" for i in range(m.n_layers)],
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, n_shared_experts=m.num_shared_experts,
        n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k, n_group=m.n_group, topk_group=m.topk_group,
        routed_scaling_factor=m.route_scale, norm_topk_prob=m.route_norm, q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std, tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
    )
    torch.manual_seed(cfg.seed)
    net = AXK1ForCausalLM(rc).float().train()  # transformers' defaults: sdpa attention, grouped_mm experts
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, foreach=True)
    impl = f"attn={net.config._attn_implementation} experts={net.config._experts_implementation}"

    def step(tokens, labels, positions):
        logits = net(input_ids=tokens, position_ids=positions, use_cache=False).logits
        n = (labels != -100).sum()
        loss = training.ce_sums(logits, [labels])[0] / n  # the same loss code as ours
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in net.parameters()), impl


# ---- variants ---------------------------------------------------------------------------------
gemm = cfg.hardware.expert_gemm_dtype
variants = {}
variants["ours"], ours_params = build_ours(0, gemm)
variants["reference"], ref_params, ref_impl = build_reference()
if not args.no_mtp:
    variants["ours+mtp"], mtp_params = build_ours(1, gemm)
if args.expert_gemm_dtype:
    variants[f"ours (experts {args.expert_gemm_dtype})"], _ = build_ours(0, args.expert_gemm_dtype)

g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, m.vocab_size, (args.batch, args.seq + 1), generator=g)
inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
positions = torch.arange(args.seq).expand(args.batch, -1).contiguous()  # one document per row
n_tok = args.batch * args.seq

print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
      f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; batch {args.batch} x seq {args.seq} "
      f"= {n_tok} tokens/step; fp32 params/activations; AdamW lr {o.lr}")
print("model:", {k: m[k] for k in ("vocab_size", "dim", "n_layers", "n_dense_layers", "dense_hidden_dim",
                                   "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                   "qk_rope_head_dim", "v_head_dim", "num_experts", "moe_hidden_dim",
                                   "num_shared_experts", "top_k", "n_group", "topk_group")})
print(f"ours: attention={cfg.hardware.attention} expert_gemm_dtype={gemm} (FSDP2, 1 rank); reference: {ref_impl}")
print(f"params: ours {ours_params['total_params']:,} (active {ours_params['active_params']:,})"
      f"  reference {ref_params:,}" + ("" if args.no_mtp else f"  [ours+mtp adds {mtp_params['mtp_params']:,}]"))

# ---- timing: warmup, then round-robin one step per variant, so that load from other processes
# on the machine hits every variant alike; per-step medians (wall and process CPU time) ---------
for name, step in variants.items():
    for _ in range(args.warmup):
        loss = step(inputs, labels, positions)
    print(f"  warm {name}: loss {loss:.4f}")
wall, cpu = {name: [] for name in variants}, {name: [] for name in variants}
for _ in range(args.steps):
    for name, step in variants.items():
        t0, c0 = time.perf_counter(), time.process_time()
        step(inputs, labels, positions)
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)

med = {name: statistics.median(w) for name, w in wall.items()}
print(f"\n{'variant':28s} {'tok/s':>8s} {'vs ref':>7s} {'ms/step':>8s} {'p25-p75 ms':>13s} {'cpu-s/step':>10s}")
for name, w in wall.items():
    q = statistics.quantiles(w, n=4) if len(w) > 1 else [w[0]] * 3
    print(f"{name:28s} {n_tok / med[name]:8,.0f} {med['reference'] / med[name]:6.2f}x {1e3 * med[name]:8.0f} "
          f"{1e3 * q[0]:6.0f}-{1e3 * q[2]:<6.0f} {statistics.median(cpu[name]):10.2f}")
if args.expert_gemm_dtype:
    before = med[f"ours (experts {args.expert_gemm_dtype})"]
    print(f"ratio ours/reference: before (experts {args.expert_gemm_dtype}) {med['reference'] / before:.2f}x "
          f"-> after (experts {gemm}) {med['reference'] / med['ours']:.2f}x")

# ---- profile: top ops by self CPU time, per variant ------------------------------------------
if args.profile:
    from torch.profiler import ProfilerActivity, profile
    for name, step in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step(inputs, labels, positions)
        print(f"\n==== profile: {name} (2 steps) ====")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))
dist.destroy_process_group()
