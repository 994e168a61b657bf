"""Worker for tests/test_context_parallel.py (torchrun, gloo): one MLA layer of the tiny model under
CP against the same layer on the full rows, forward and gradients. Every rank builds the same
layer and inputs from one seed; prints one JSON line of max errors on rank 0."""

import json

import torch
import torch.distributed as dist

from kit import context_parallel  # noqa: E402
import kernels  # noqa: E402
import model as axk1  # noqa: E402

dist.init_process_group("gloo")
rank, cp = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
m = axk1.load_model_cfg("tiny")
with torch.device("meta"):
    mla = axk1.build_model_config(m, attention="sdpa").layers[1].attention.build()
mla.to_empty(device="cpu")
with torch.no_grad():
    mla.init_states(buffer_device=torch.device("cpu"))

# Two packed rows of 64 tokens, 16-token chunks on 2 ranks: documents start at 0, 13, 40 (row 0,
# crossing the chunk borders at 16, 32 and 48) and 0, 5, 30 (row 1); positions restart at each.
B, L = 2, 64
starts = [[0, 13, 40], [0, 5, 30]]
positions = torch.zeros(B, L, dtype=torch.long)
for b, ss in enumerate(starts):
    for s, e in zip(ss, ss[1:] + [L]):
        positions[b, s:e] = torch.arange(e - s)
x = torch.randn(B, L, m.dim)
w_out = torch.randn(B, L, m.dim)  # a fixed random readout, so every output element gets a gradient

# Reference: the full rows on one rank (this rank computes it too; no CP group).
x_ref = x.clone().requires_grad_(True)
out_ref = mla(x_ref, kernels.additive_mask(kernels.document_causal_mask(positions)), positions)
(out_ref * w_out).sum().backward()
grads_ref = {n: p.grad.clone() for n, p in mla.named_parameters()}
mla.zero_grad(set_to_none=True)

# CP: this rank's head-tail chunks only.
context_parallel.apply(mla, dist.group.WORLD)
ctx = context_parallel.ContextParallel(dist.group.WORLD, flex=False)
batch = {"input_ids": torch.zeros(B, L, dtype=torch.long), "positions": positions}
local, _ = ctx.shard(batch, [], 0)
idx = local["q_index"]
masks = ctx.masks(local, slice(0, B), torch.device("cpu"))
x_loc = x[:, idx].clone().requires_grad_(True)
context_parallel.reset_traffic()
out = mla(x_loc, masks, local["positions"])
(out * w_out[:, idx]).sum().backward()
err = {"out": (out - out_ref[:, idx]).abs().max().item(),
       "x_grad": (x_loc.grad - x_ref.grad[:, idx]).abs().max().item(),
       "out_scale": out_ref.abs().max().item()}
param_err = 0.0
for n, p in mla.named_parameters():
    g = p.grad.clone()
    dist.all_reduce(g)  # what FSDP's sum over the cp ranks does
    param_err = max(param_err, ((g - grads_ref[n]).abs().max() / grads_ref[n].abs().max().clamp(min=1e-12)).item())
err["param_grad_rel"] = param_err
err["traffic"] = dict(context_parallel.TRAFFIC)
latent_bytes = B * (L // cp) * (m.kv_lora_rank + m.qk_rope_head_dim) * 4
err["expected_allgather_bytes"] = latent_bytes * (cp - 1)
if rank == 0:
    print("CPCHECK " + json.dumps(err), flush=True)
# every rank done with its collectives before teardown: gloo can abort a rank whose peer
# destroys the group while its own work is still in flight ('terminate called', seen once in CI)
dist.barrier()
dist.destroy_process_group()
