"""KV-cached sampling from the A.X K1 model, for RL rollouts and evaluation.

torchtitan's MLA has no inference cache, so decoding here re-uses the model's own modules and
weights step by step and keeps, per layer, what MLA is designed to cache: the normalised latent
c_kv (kv_lora_rank wide) and the rotated shared key part k_pe, not per-head keys and values.
Each step up-projects the cached latent with the layer's own wkv_b. `tests/test_kv_decoding.py`
checks the result equals greedy argmax of the full (uncached) model forward.

RL's `local` rollout backend (LocalRollouts) runs it on a separate, unsharded copy of the policy
(the trainer's model is wrapped by FSDP2/EP, whose hooks only fire on whole-module calls):
`sync_weights` copies the trainer's full state into it before every rollout. The `vllm` backend
(vllm_engine.py) has the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import DictConfig

import model as axk1


def build_inference_model(model_cfg: DictConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A plain (not parallelized) model for decoding on `device` (RL and evaluation pass the
    trainer's, training.device_of); weights come from `sync_weights`/`load`."""
    # routed-expert GEMMs: fp32 on a CPU (kernels.GroupedExpertsMM: bf16 is slow there); elsewhere
    # bf16, the one dtype CUDA's torch._grouped_mm takes (its meta kernel checks the same)
    gemm_dtype = "float32" if torch.device(device).type == "cpu" else "bfloat16"
    net = axk1.build_model_config(model_cfg, attention="sdpa", expert_gemm_dtype=gemm_dtype, expert_fuse_gate_up=True,
                                  bias_update_rate=0.0).build()
    net.to(device)
    with torch.no_grad():
        net.init_states(buffer_device=torch.device(device))
    return net.eval()


def sync_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy the trainer's (possibly FSDP/EP-sharded) weights and buffers into the decode model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    sd = get_model_state_dict(src, options=StateDictOptions(full_state_dict=True))
    dst.load_state_dict({k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()},
                        strict=True)


@dataclass
class Rollout:
    tokens: list[int]      # generated ids, eos included when produced
    truncated: bool        # hit max_new_tokens without eos (DAPO overlong filtering masks these)

    @classmethod
    def of(cls, tokens: list[int], eos_id: int) -> "Rollout":
        """Every backend's rule (this decoder, vLLM, a served endpoint): truncated unless it ends in eos."""
        return cls(tokens, truncated=(not tokens or tokens[-1] != eos_id))


def request_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """One sampling seed per prompt for engines that take seeds (vLLM, endpoints), drawn from the
    caller's generator so their sampled rollouts repeat like this decoder's."""
    return torch.randint(2**31 - 1, (n,), generator=generator).tolist()


class _LayerCache:
    def __init__(self):
        self.c_kv = None   # (B, T, kv_lora_rank), after kv_norm
        self.k_pe = None   # (B, T, 1, qk_rope_head_dim), rotated

    def append(self, c, k_pe):
        self.c_kv = c if self.c_kv is None else torch.cat([self.c_kv, c], 1)
        self.k_pe = k_pe if self.k_pe is None else torch.cat([self.k_pe, k_pe], 1)


def _attention(attn, x, positions, cache: _LayerCache, mask):
    """torchtitan's MLA forward for new tokens x against cached + new keys (mask: B,1,Lq,Tk)."""
    B, L, _ = x.shape
    q = attn.wq(x) if attn.q_lora_rank == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(B, L, -1, attn.qk_head_dim)
    q_nope, q_pe = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    c, k_pe = torch.split(attn.wkv_a(x), [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    q_pe, k_pe = attn.rope(q_pe, k_pe.unsqueeze(2), positions)
    cache.append(attn.kv_norm(c), k_pe)
    T = cache.c_kv.shape[1]
    kv = attn.wkv_b(cache.c_kv).view(B, T, -1, attn.qk_nope_head_dim + attn.v_head_dim)
    k_nope, v = torch.split(kv, [attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    k = torch.cat([k_nope, cache.k_pe.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=attn.softmax_scale)
    return attn.wo(out.transpose(1, 2).reshape(B, L, -1))


def _step(net, tokens, positions, caches, mask):
    """Logits of the main head for `tokens`, extending every layer's cache (AXK1Block.forward)."""
    h = net.tok_embeddings(tokens)
    for block, cache in zip(net.layers.values(), caches):
        h = h + _attention(block.attention, block.attention_norm(h), positions, cache, mask)
        if block.moe_enabled:
            h = h + block.post_moe_norm(block.moe(block.ffn_norm(h)))
        else:
            h = h + block.feed_forward(block.ffn_norm(h))
    return net.lm_head(net.norm(h))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, valid) with prompts right-aligned; positions count from each prompt's start."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        valid[i, P - len(p):] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    return ids, positions, valid


@torch.no_grad()
def generate(net, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> list[Rollout]:
    """Sample (temperature > 0) or greedy-decode (temperature 0) a batch of prompts with the cache."""
    was_training = net.training
    net.eval()
    device = net.tok_embeddings.weight.device
    ids, positions, valid = (t.to(device) for t in left_pad(prompts, pad_id))
    B, P = ids.shape
    caches = [_LayerCache() for _ in net.layers]
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril_()
    # a query sees earlier real tokens; pad queries see themselves only (keeps softmax finite)
    mask = (causal & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
    logits = _step(net, ids, positions, caches, mask[:, None])[:, -1]
    key_valid, pos = valid, positions[:, -1]
    out = [[] for _ in range(B)]
    active = torch.arange(B, device=device)  # rows still decoding; finished rows leave the batch
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:  # Gumbel-max: an exact categorical sample, much cheaper than multinomial on CPU
            lg = logits.float() / temperature
            if top_k > 0:
                kth = lg.topk(top_k, dim=-1).values[:, -1:]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            u = torch.rand(lg.shape, generator=generator).clamp_(min=1e-20).to(device)
            nxt = (lg - torch.log(-torch.log(u))).argmax(-1)
        for j, i in enumerate(active.tolist()):
            out[i].append(int(nxt[j]))
        live = nxt != eos_id
        if not bool(live.any()):
            break
        if not bool(live.all()):
            keep = torch.nonzero(live).flatten()
            active, nxt, pos, key_valid = active[keep], nxt[keep], pos[keep], key_valid[keep]
            for c in caches:
                c.c_kv, c.k_pe = c.c_kv[keep], c.k_pe[keep]
        pos = pos + 1
        key_valid = torch.cat([key_valid, torch.ones(len(active), 1, dtype=torch.bool, device=device)], 1)
        logits = _step(net, nxt[:, None], pos[:, None], caches, key_valid[:, None, None, :])[:, -1]
    net.train(was_training)
    return [Rollout.of(o, eos_id) for o in out]


class LocalRollouts:
    """The `local` rollout backend (stage/rl.yaml rl.rollout_backend): `generate` on an unsharded decode
    copy of the policy, refreshed by `sync_weights`. For CPU and small models: every rank holds the
    whole model, which a 519B policy does not fit (use `vllm`: vllm_engine.VLLMRollouts)."""

    def __init__(self, model_cfg: DictConfig, pad_id: int, device: str | torch.device = "cpu"):
        self.net, self.pad_id = build_inference_model(model_cfg, device), pad_id

    def load(self, net: torch.nn.Module) -> None:
        sync_weights(net, self.net)

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, temperature: float,
               generator: torch.Generator | None = None) -> list[Rollout]:
        return generate(self.net, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=self.pad_id,
                        temperature=temperature, generator=generator)

    def close(self) -> None:
        pass


@torch.no_grad()
def generate_uncached(net, prompt: list[int], *, max_new_tokens: int, eos_id: int) -> list[int]:
    """Reference greedy decode: the full model forward over the whole sequence at every step."""
    net.eval()
    seq, device = list(prompt), net.tok_embeddings.weight.device
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq], device=device)
        pos = torch.arange(len(seq), device=device)[None]
        logits = net(ids, pos, net.get_attention_masks(pos))
        logits = logits[0] if isinstance(logits, list) else logits
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


def load_weights(net: torch.nn.Module, ckpt) -> None:
    """Model entries of a DCP checkpoint into the plain decode model (resharded by DCP)."""
    have = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = net.state_dict()
    missing = [k for k in sd if f"model.{k}" not in have]
    if missing:
        raise KeyError(f"{ckpt}: checkpoint lacks {missing[0]} ({len(missing)} entries): another architecture?")
    dcp.load({"model": sd}, storage_reader=dcp.FileSystemReader(str(ckpt)))
    net.load_state_dict(sd)
