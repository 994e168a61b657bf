"""A.X K1 (SPEC section 1) assembled from torchtitan's DeepSeek-V3 components.

A.X K1 is DeepSeek-V3's architecture (MLA + sigmoid group-limited top-k MoE with a shared
expert, auxiliary-loss-free balancing, MTP) with three deltas that this file adds on top of
torchtitan's modules rather than re-implementing them:
  * the dual norm: an RMSNorm on the MoE block's output, MoE layers only (paper 2.2);
  * the sequence-wise auxiliary balance loss (alpha 1e-4), which torchtitan's MoE lacks;
  * a router-bias update rate that may be 0 (stage 3 freezes the bias, paper 3.2) while the
    bias itself keeps being applied.
`model_registry()` returns a torchtitan ModelSpec, so torchtitan's parallelize (FSDP2/EP/CP),
pipeline, checkpoint and float8 paths apply unchanged.

`python -m model --model axk1_519b` prints total/active parameter counts from a meta-device build.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtitan.components.optimizer import register_moe_load_balancing_hook
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter
from torchtitan.models.deepseek_v3 import MTPTransformerBlock, build_mla_moe_layers
from torchtitan.models.deepseek_v3.model import (
    DeepSeekV3Model,
    DeepSeekV3TransformerBlock,
)
from torchtitan.models.deepseek_v3.mtp import roll_mtp_sequence
from torchtitan.protocols.model_spec import ModelSpec

import kernels
from kit import context_parallel, memory_features

CONF_DIR = Path(__file__).resolve().parent / "conf"


# ----------------------------------------------------------------------------------------
# Router + MoE: keep torchtitan's routing, add the sequence-wise balance loss.
# ----------------------------------------------------------------------------------------
class AXK1Router(TokenChoiceTopKRouter):
    """torchtitan's token-choice router; remembers its last scores for the balance loss."""

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        pass

    def forward(self, x_BLD, expert_bias_E=None):
        topk_scores, topk_ids, scores = super().forward(x_BLD, expert_bias_E)
        self.last_scores_BLE, self.last_ids_BLK = scores, topk_ids
        return topk_scores, topk_ids, scores


def sequence_balance_loss(scores_BLE: torch.Tensor, ids_BLK: torch.Tensor, cp_group=None,
                          valid_BL: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over sequences.

    f_i = E / (K * L) * #tokens of the sequence routed to expert i, P_i = mean over the
    sequence of the normalised affinity s_i / sum_j s_j; loss = sum_i f_i * P_i (1 at balance).
    Under context parallel (`cp_group`) a sequence's tokens are spread over the CP ranks: the
    per-sequence sums run over the whole sequence, gradients go to each rank's own tokens.
    With valid_BL, L counts only real tokens: padding is not part of any sequence, and a row
    of padding only is left out of the mean.
    """
    B, L, E = scores_BLE.shape
    K = ids_BLK.shape[-1]
    v_BL1 = torch.ones(B, L, 1, dtype=scores_BLE.dtype, device=scores_BLE.device) if valid_BL is None \
        else valid_BL.to(scores_BLE.dtype).unsqueeze(-1)
    hits_BE = (torch.zeros_like(scores_BLE).scatter_(-1, ids_BLK, 1.0) * v_BL1).sum(dim=1)
    p_sum_BE = (scores_BLE / scores_BLE.sum(dim=-1, keepdim=True) * v_BL1).sum(dim=1)
    n_B1 = v_BL1.sum(dim=1)
    if cp_group is not None:
        hits_BE = context_parallel.sum_over_sequence_ranks(hits_BE, cp_group)
        p_sum_BE = context_parallel.sum_over_sequence_ranks(p_sum_BE, cp_group)
        n_B1 = context_parallel.sum_over_sequence_ranks(n_B1, cp_group)
    live_B = (n_B1 > 0).squeeze(-1).to(scores_BLE.dtype)
    n_B1 = n_B1.clamp(min=1.0)
    f_BE = hits_BE * E / (K * n_B1)
    per_seq_B = (f_BE * p_sum_BE / n_B1).sum(dim=-1)
    return (per_seq_B * live_B).sum() / live_B.sum().clamp(min=1.0)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out` whose backward also sends `grad_scale` into `aux`.

    Attaching the aux loss to the activations (instead of returning it) keeps it working
    through pipeline stages and activation recomputation, where side outputs are lost.
    """

    @staticmethod
    def forward(ctx, out, aux, grad_scale: float):
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, grad_out.new_tensor(ctx.grad_scale), None


class AXK1MoE(MoE):
    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        aux_loss_alpha: float = 1e-4
        bias_update_rate: float = 1e-3

    def __init__(self, config: Config):
        # torchtitan only keeps `expert_bias_E` when load_balance_coeff > 0; A.X K1 must keep
        # applying the learnt bias while its update rate is 0 (stage 3), so build with a
        # positive coefficient and then install the real rate. torchtitan's optimizer hook
        # multiplies by it, so a rate of 0 freezes the bias.
        super().__init__(dataclasses.replace(config, load_balance_coeff=1.0))
        self.load_balance_coeff = config.bias_update_rate
        self.aux_loss_alpha = config.aux_loss_alpha
        self.aux_grad_scale = 1.0  # 1 / micro-batches, set by the training loop
        self.aux_token_mask = None  # [B, L] real (non-pad) tokens of the next forward, set by the loop
        self.last_aux_loss = None  # detached, for logging
        self.cp_group = None  # the context-parallel group a sequence is split over (context_parallel.apply)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        out = super().forward(x_BLD)
        if not (self.training and self.aux_loss_alpha > 0):
            return out
        mask = self.aux_token_mask
        if mask is not None and tuple(mask.shape) != tuple(x_BLD.shape[:2]):
            mask = None  # not this forward's rows (e.g. a pipeline micro-batch): count every token
        aux = self.aux_loss_alpha * sequence_balance_loss(
            self.router.last_scores_BLE, self.router.last_ids_BLK, self.cp_group,
            None if mask is None else mask.to(x_BLD.device)
        )
        self.last_aux_loss = aux.detach()
        return _AttachAuxLoss.apply(out, aux, self.aux_grad_scale)


# ----------------------------------------------------------------------------------------
# Blocks: add the post-MoE RMSNorm (dual norm) on MoE layers only.
# ----------------------------------------------------------------------------------------
class AXK1Block(DeepSeekV3TransformerBlock):
    @dataclass(kw_only=True, slots=True)
    class Config(DeepSeekV3TransformerBlock.Config):
        post_moe_norm: RMSNorm.Config | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        if self.moe_enabled:
            self.post_moe_norm = config.post_moe_norm.build()

    def forward(self, x, attention_masks, positions=None):
        x = x + self.attention(self.attention_norm(x), attention_masks, positions)
        if self.moe_enabled:
            return x + self.post_moe_norm(self.moe(self.ffn_norm(x)))
        return x + self.feed_forward(self.ffn_norm(x))


class AXK1MTPBlock(MTPTransformerBlock):
    """torchtitan's DeepSeek-V3 MTP block with the same dual norm as the main MoE layers."""

    @dataclass(kw_only=True, slots=True)
    class Config(MTPTransformerBlock.Config):
        post_moe_norm: RMSNorm.Config | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        if self.moe_enabled:
            self.post_moe_norm = config.post_moe_norm.build()

    def forward(self, mtp_input_embed, prev_embed, mtp_input_valid_mask, attention_masks, positions=None):
        prev_embed = prev_embed * mtp_input_valid_mask.unsqueeze(-1).to(prev_embed.dtype)
        h = self.eh_proj(torch.cat([self.enorm(mtp_input_embed), self.hnorm(prev_embed)], dim=-1))
        h = h + self.attention(self.attention_norm(h), attention_masks, positions)
        if self.moe_enabled:
            h = h + self.post_moe_norm(self.moe(self.ffn_norm(h)))
        else:
            h = h + self.feed_forward(self.ffn_norm(h))
        return self.mtp_norm(h)


class AXK1Model(DeepSeekV3Model):
    @dataclass(kw_only=True, slots=True)
    class Config(DeepSeekV3Model.Config):
        def update_from_config(self, *, config, **kwargs) -> None:
            # torchtitan's MTPDecoder refuses CP because its forward rolls the MTP inputs over the
            # local tokens; the kit's CP rolls them over the full row before sharding (see
            # forward below and context_parallel.py), so torchtitan's checks run as for cp=1.
            # It refuses PP too: the kit runs MTP on the last pipeline stage (pipeline.py).
            p = config.parallelism
            if p.context_parallel_degree > 1 or p.pipeline_parallel_degree > 1:
                runtime = copy.copy(config)
                runtime.parallelism = dataclasses.replace(p, context_parallel_degree=1, pipeline_parallel_degree=1)
                if p.context_parallel_degree > 1 and getattr(config, "training", None) is not None:
                    # CP shards the tokens before MoE: EP dispatch buffers (DeepEP) are sized for this
                    # rank's seq_len/cp, as torchtitan sizes them for its own CP. (RoPE is resized from
                    # training.seq_len only for torchtitan's Trainer configs, which the kit never passes.)
                    runtime.training = dataclasses.replace(
                        config.training, seq_len=config.training.seq_len // p.context_parallel_degree)
                config = runtime
            DeepSeekV3Model.Config.update_from_config(self, config=config, **kwargs)

    # Set on each pipeline stage's chunk by pipeline.build_pipeline: True on the first stage (its
    # input is token ids), False on the others (the previous stage's hidden state). None: the
    # whole model.
    pipeline_first: bool | None = None

    def forward(self, tokens, positions=None, attention_masks=None, input_ids=None, **cp_inputs):
        if self.pipeline_first is not None:
            return self._stage_forward(tokens, positions, input_ids, cp_inputs)
        if not (isinstance(attention_masks, context_parallel.CPMasks) and self.mtp_layers is not None):
            return super().forward(tokens, positions, attention_masks)
        # Under CP: MTPDecoder.forward, with each depth's shifted tokens taken from the CP masks
        # (rolled over the full row) instead of rolled over this rank's chunks.
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, attention_masks, positions)
        outputs, prev = [self.norm(h)], h
        for layer, (shifted, valid) in zip(self.mtp_layers, attention_masks.mtp_inputs):
            prev = layer(self.tok_embeddings(shifted), prev, valid, attention_masks, positions)
            outputs.append(prev)
        return [self.lm_head(o) for o in outputs]

    def _stage_forward(self, x, positions, input_ids, cp_inputs: dict):
        """One pipeline stage: the modules the split left on this chunk (the others are None or
        empty). Masks are built per micro-batch from positions (the schedule splits tensors only),
        under CP from context_parallel.stage_inputs' tensors; the last stage runs the head and the
        MTP layers, embedding the shifted token ids with its copy of the embedding (see pipeline.py)."""
        cp = bool(cp_inputs)
        masks = context_parallel.stage_masks(self, **cp_inputs) if cp else self.get_attention_masks(positions)
        h = self.tok_embeddings(x) if self.pipeline_first else x
        for layer in self.layers.values():
            h = layer(h, masks, positions)
        if self.lm_head is None:
            return h
        outputs = [self.lm_head(self.norm(h))]
        for depth, layer in enumerate(self.mtp_layers or [], 1):
            ids, valid = masks.mtp_inputs[depth - 1] if cp else roll_mtp_sequence(
                input_ids, shift=depth, fill_value=0, positions=positions, return_valid_mask=True)
            h = layer(self.tok_embeddings(ids), h, valid, masks, positions)
            outputs.append(self.lm_head(h))
        return outputs if len(outputs) > 1 else outputs[0]

    def get_attention_masks(self, positions: torch.Tensor):
        # The CPU attention kernel takes a dense causal+document mask; flex/varlen use
        # torchtitan's own mask builders.
        if isinstance(self.config.first_attention.inner_attention, kernels.DocumentSDPA.Config):
            return kernels.additive_mask(kernels.document_causal_mask(positions))
        return super().get_attention_masks(positions)


# ----------------------------------------------------------------------------------------
# Config -> torchtitan Config tree
# ----------------------------------------------------------------------------------------
def _std_init(std: float):
    return {"weight": lambda w: torch.nn.init.trunc_normal_(w, std=std), "bias": torch.nn.init.zeros_}


def _fields(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.name.startswith("_")}


def build_model_config(m: DictConfig, *, attention: str, moe_comm_backend: str = "standard",
                       expert_gemm_dtype: str = "bfloat16", expert_fuse_gate_up: bool = False,
                       bias_update_rate: float = 1e-3, ce_chunk_tokens: int = 0) -> AXK1Model.Config:
    """Turn the Hydra `model` group (conf/model/*.yaml) into torchtitan's config tree.
    `ce_chunk_tokens` > 0 gives the head a chunked cross-entropy (memory_features.ChunkedHead)."""
    std = m.init_std
    linear_init, norm_init = _std_init(std), {"weight": torch.nn.init.ones_}
    experts_init = {k: (lambda w: torch.nn.init.trunc_normal_(w, std=std)) for k in ("w1_EFD", "w2_EDF", "w3_EFD")}
    rope = ComplexRoPE.Config(dim=m.qk_rope_head_dim, max_seq_len=m.max_seq_len, theta=m.rope_theta)
    layers = build_mla_moe_layers(
        n_layers=m.n_layers, n_dense_layers=m.n_dense_layers, dim=m.dim, n_heads=m.n_heads,
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, mscale=1.0,
        dense_hidden_dim=m.dense_hidden_dim, moe_hidden_dim=m.moe_hidden_dim,
        num_experts=m.num_experts, num_shared_experts=m.num_shared_experts,
        router_top_k=m.top_k, router_score_func=m.score_func,
        router_num_expert_groups=m.n_group, router_num_limited_groups=m.topk_group,
        router_route_scale=m.route_scale, router_route_norm=m.route_norm,
        attn_backend="flex",  # replaced below when the hardware asks for another kernel
        moe_comm_backend=moe_comm_backend, non_blocking_capacity_factor=None,
        linear_init=linear_init, norm_init=norm_init, depth_init=lambda _i: linear_init,
        depth_experts_init=lambda _i: experts_init, rope=rope,
    )
    inner_attention = kernels.attention_config(attention)

    def norm():
        return RMSNorm.Config(normalized_shape=m.dim, eps=m.norm_eps, param_init=norm_init)

    def convert(block, block_cls):
        f = _fields(block)
        f["attention"] = context_parallel.MLA.Config(**{**_fields(block.attention), "inner_attention": inner_attention})
        f["attention"].q_norm = dataclasses.replace(f["attention"].q_norm, eps=m.norm_eps)
        f["attention"].kv_norm = dataclasses.replace(f["attention"].kv_norm, eps=m.norm_eps)
        f["attention_norm"], f["ffn_norm"] = norm(), norm()
        if block.moe is not None:
            moe = _fields(block.moe)
            moe["router"] = AXK1Router.Config(**_fields(block.moe.router))
            inner = kernels.GroupedExpertsMM.Config(**_fields(block.moe.routed_experts.inner_experts),
                                                    gemm_dtype=expert_gemm_dtype,
                                                    fuse_gate_up=expert_fuse_gate_up)
            moe["routed_experts"] = dataclasses.replace(block.moe.routed_experts, inner_experts=inner)
            f["moe"] = AXK1MoE.Config(**moe, aux_loss_alpha=m.aux_loss_alpha, bias_update_rate=bias_update_rate)
            f["post_moe_norm"] = norm()
        return block_cls.Config(**f)

    blocks = [convert(b, AXK1Block) for b in layers]
    mtp = []
    for _ in range(m.num_mtp_layers):
        f = _fields(convert(layers[-1], AXK1Block))
        mtp.append(AXK1MTPBlock.Config(
            **f, enorm=norm(), hnorm=norm(), mtp_norm=norm(),
            eh_proj=Linear.Config(in_features=2 * m.dim, out_features=m.dim, bias=False, param_init=linear_init),
        ))
    return AXK1Model.Config(
        vocab_size=m.vocab_size, dim=m.dim,
        tok_embeddings=Embedding.Config(num_embeddings=m.vocab_size, embedding_dim=m.dim,
                                        param_init={"weight": lambda w: torch.nn.init.normal_(w, std=std)}),
        norm=norm(),
        lm_head=memory_features.ChunkedHead.Config(in_features=m.dim, out_features=m.vocab_size, param_init=linear_init,
                                          chunk_tokens=ce_chunk_tokens),
        layers=blocks, mtp_layers=mtp,
        enable_weight_tying=False,  # untied embeddings (SPEC 1)
    )


def model_registry(model_cfg: DictConfig, *, attention: str = "flex", moe_comm_backend: str = "standard",
                   expert_gemm_dtype: str = "bfloat16", expert_fuse_gate_up: bool = False,
                   bias_update_rate: float = 1e-3, ce_chunk_tokens: int = 0) -> ModelSpec:
    """Register A.X K1 with torchtitan: its own parallelize/pipeline/balancing hooks apply."""
    return ModelSpec(
        name="axk1", flavor=model_cfg.name,
        model=build_model_config(model_cfg, attention=attention, moe_comm_backend=moe_comm_backend,
                                 expert_gemm_dtype=expert_gemm_dtype, expert_fuse_gate_up=expert_fuse_gate_up,
                                 bias_update_rate=bias_update_rate, ce_chunk_tokens=ce_chunk_tokens),
        parallelize_fn=context_parallel.parallelize,  # torchtitan's parallelize_deepseekv3 + the kit's CP
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=register_moe_load_balancing_hook,
        state_dict_adapter=None,
    )


def moe_layers(model: torch.nn.Module) -> list[AXK1MoE]:
    return [m for m in model.modules() if isinstance(m, AXK1MoE)]


def count_params(model: torch.nn.Module, m: DictConfig) -> dict:
    """Total and active (per-token) parameters, MTP reported separately."""
    total = active = mtp = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp_layers."):
            mtp += n
            continue
        total += n
        active += n * m.top_k // m.num_experts if ".routed_experts." in name else n
    return {"total_params": total, "active_params": active, "mtp_params": mtp}


def load_model_cfg(name: str) -> DictConfig:
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Count A.X K1 parameters on the meta device")
    ap.add_argument("--model", default="axk1_519b", help="a name from conf/model/")
    mcfg = load_model_cfg(ap.parse_args().model)
    with torch.device("meta"):
        net = build_model_config(mcfg, attention="sdpa").build()
    print(json.dumps(count_params(net, mcfg)))
