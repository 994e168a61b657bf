"""A.X K1 architecture on torchtitan: routing, balancing, dual norm, MTP targets, sizes."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_cfg

import model as axk1
from kit import training


def tiny_model(**overrides):
    cfg = compose_cfg(overrides=[f"model.{k}={v}" for k, v in overrides.items()])
    net = axk1.build_model_config(cfg.model, attention="sdpa", expert_gemm_dtype="float32").build()
    with torch.no_grad():
        net.init_states(buffer_device=torch.device("cpu"))
    return cfg, net


def first_moe(net) -> axk1.AXK1MoE:
    return axk1.moe_layers(net)[0]


def test_router_picks_only_inside_top_groups():
    cfg, net = tiny_model()
    m = cfg.model
    moe = first_moe(net)
    x = torch.randn(2, 64, m.dim)
    with torch.no_grad():
        moe.expert_bias_E.copy_(torch.randn(m.num_experts) * 0.05)  # groups are chosen with the bias
        _, ids, scores = moe.router(x, moe.expert_bias_E)
    per_group = m.num_experts // m.n_group
    biased = (scores + moe.expert_bias_E).view(2, 64, m.n_group, per_group)
    group_score = biased.topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3: sum of the top-2 per group
    allowed = group_score.topk(m.topk_group, dim=-1).indices  # (B, L, topk_group)
    chosen_groups = ids // per_group
    assert ids.shape[-1] == m.top_k
    inside = (chosen_groups.unsqueeze(-1) == allowed.unsqueeze(-2)).any(-1)
    assert inside.all(), "an expert outside the top topk_group groups was selected"
    # and within the allowed groups the choice is the top-k of the biased scores
    masked = biased.clone()
    keep = torch.zeros(2, 64, m.n_group, dtype=torch.bool).scatter_(-1, allowed, True)
    masked[~keep] = float("-inf")
    expect = masked.flatten(-2).topk(m.top_k, dim=-1).indices.sort(-1).values
    assert torch.equal(ids.sort(-1).values, expect)


def test_bias_changes_selection_but_not_combine_weights():
    cfg, net = tiny_model()
    m = cfg.model
    moe = first_moe(net)
    x = torch.randn(1, 32, m.dim)
    with torch.no_grad():
        _, ids0, scores = moe.router(x, torch.zeros(m.num_experts))
        bias = torch.zeros(m.num_experts)
        target = m.num_experts - 1
        bias[target] = 10.0  # huge bias: the expert wins every token's selection...
        w, ids, scores_b = moe.router(x, bias)
    assert (ids == target).any(-1).all()
    assert not (ids0 == target).any(-1).all()
    # ...but the gate weights are the unbiased sigmoid scores, normalised over the chosen k and
    # scaled by routed_scaling_factor.
    s = scores_b.gather(-1, ids)
    assert torch.allclose(scores_b, scores)
    assert torch.allclose(w, m.route_scale * s / s.sum(-1, keepdim=True), atol=1e-6)


def test_bias_update_moves_load_toward_balance(single_process_group):
    cfg = compose_cfg(overrides=["parallelism=none", "optim.lr=0.0", "optim.weight_decay=0.0"])
    net, spec, pdims, _ = training.build_model(cfg, 1, bias_update_rate=0.01, seed=0)
    opt = training.build_optimizer(net, cfg.optim, spec, pdims)
    # A skewed batch: a handful of repeated tokens routes to a few experts in every layer.
    tokens = torch.tensor([[5, 6, 7, 8] * 32] * 4)
    positions = torch.arange(128).repeat(4, 1)
    imbalance = []
    for _ in range(12):
        preds = net(tokens, positions, net.get_attention_masks(positions))
        sum(training.ce_sums(preds, training.loss_labels(tokens, positions, 1))).backward()
        imbalance.append(training.expert_load_imbalance(net))
        opt.step()  # torchtitan's pre-step hook moves the bias by rate * sign(mean - load)
        opt.zero_grad()
    assert imbalance[-1] < 0.7 * imbalance[0], imbalance
    # weights did not move (lr 0): only the router bias balanced the load
    assert any(m.expert_bias_E.abs().sum() > 0 for m in axk1.moe_layers(net))


def test_bias_update_rate_zero_freezes_bias_but_keeps_applying_it(single_process_group):
    cfg = compose_cfg(overrides=["parallelism=none", "optim.lr=0.0", "optim.weight_decay=0.0"])
    net, spec, pdims, _ = training.build_model(cfg, 1, bias_update_rate=0.0, seed=0)
    opt = training.build_optimizer(net, cfg.optim, spec, pdims)
    moe = axk1.moe_layers(net)[0]
    with torch.no_grad():
        moe.expert_bias_E.copy_(torch.linspace(-0.1, 0.1, moe.expert_bias_E.numel()))
    before = moe.expert_bias_E.clone()
    tokens = torch.randint(0, 4096, (2, 64))
    positions = torch.arange(64).repeat(2, 1)
    sum(training.ce_sums(net(tokens, positions, net.get_attention_masks(positions)),
                         training.loss_labels(tokens, positions, 1))).backward()
    opt.step()
    assert torch.equal(moe.expert_bias_E, before)


def test_post_moe_norm_exactly_on_moe_layers():
    cfg, net = tiny_model()
    for i, block in enumerate(net.layers.values()):
        assert block.moe_enabled == (i >= cfg.model.n_dense_layers)
        assert hasattr(block, "post_moe_norm") == block.moe_enabled
    assert all(hasattr(b, "post_moe_norm") for b in net.mtp_layers)
    # The norm acts on the MoE output before the residual add: zeroing its gain removes the MoE
    # contribution entirely, leaving x + attention.
    block = net.layers["1"]
    x = torch.randn(1, 16, cfg.model.dim)
    pos = torch.arange(16).unsqueeze(0)
    mask = net.get_attention_masks(pos)
    with torch.no_grad():
        block.post_moe_norm.weight.zero_()
        after_attn = x + block.attention(block.attention_norm(x), mask, pos)
        assert torch.allclose(block(x, mask, pos), after_attn)
        block.post_moe_norm.weight.fill_(2.0)
        moe_out = block.moe(block.ffn_norm(after_attn))
        normed = torch.nn.functional.rms_norm(moe_out, (cfg.model.dim,), eps=cfg.model.norm_eps) * 2.0
        assert torch.allclose(block(x, mask, pos), after_attn + normed, atol=1e-5)


def test_mtp_targets_are_tokens_shifted_by_two():
    tokens = torch.arange(100, 121).unsqueeze(0)  # 21 tokens -> 20 inputs + labels
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(20).unsqueeze(0).clone()
    positions[0, 12:] = torch.arange(8)  # a second packed document starts at index 12
    main, mtp = training.loss_labels(labels, positions, num_mtp=1)
    assert torch.equal(main, labels)
    for i in range(20):
        if i + 2 < 21 and (i + 1 < 12 or i >= 12) and i != 19:
            assert mtp[0, i] == inputs[0, i] + 2, i
    assert mtp[0, 11] == -100  # would cross into the next document
    assert mtp[0, 19] == -100  # past the end


def test_mtp_head_predicts_a_separate_distribution():
    cfg, net = tiny_model()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32))
    pos = torch.arange(32).repeat(2, 1)
    preds = net(tokens, pos, net.get_attention_masks(pos))
    assert isinstance(preds, list) and len(preds) == 1 + cfg.model.num_mtp_layers
    assert preds[0].shape == preds[1].shape == (2, 32, cfg.model.vocab_size)
    assert not torch.allclose(preds[0], preds[1])


def test_sequence_balance_loss_values_and_gradient():
    E, K, L = 8, 2, 16
    uniform = torch.full((1, L, E), 0.5)
    ids = torch.arange(L * K).view(1, L, K) % E  # perfectly balanced
    assert torch.isclose(axk1.sequence_balance_loss(uniform, ids), torch.tensor(1.0))
    skew_ids = torch.tensor([[0, 1]]).expand(1, L, K)
    skew_scores = torch.full((1, L, E), 0.1)
    skew_scores[..., :2] = 0.9
    assert axk1.sequence_balance_loss(skew_scores, skew_ids) > 2.0
    # The aux loss reaches the router gate through the attached gradient alone.
    cfg, net = tiny_model(aux_loss_alpha=0.5)
    moe = first_moe(net)
    moe.train()
    out = moe(torch.randn(2, 16, cfg.model.dim))
    (out * 0).sum().backward()
    assert moe.router.gate.weight.grad is not None and moe.router.gate.weight.grad.abs().sum() > 0


def test_document_mask_blocks_other_documents():
    import kernels

    pos = torch.tensor([[0, 1, 2, 0, 1]])
    mask = kernels.document_causal_mask(pos)[0, 0]
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                           [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expect)


def test_axk1_519b_parameter_counts():
    out = subprocess.run([sys.executable, "-m", "model", "--model", "axk1_519b"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(counts["total_params"] / 519e9 - 1) < 0.005, counts
    assert abs(counts["active_params"] / 33e9 - 1) < 0.02, counts
    assert counts["mtp_params"] > 0


@pytest.mark.parametrize("name", ["tiny", "axk1_519b"])
def test_untied_embeddings(name):
    cfg = compose_cfg(overrides=[f"model={name}"])
    assert axk1.build_model_config(cfg.model, attention="sdpa").enable_weight_tying is False


def test_fused_gate_up_expert_gemm_matches_the_two_gemm_path():
    # hardware.expert_fuse_gate_up (CPU configs) must be a pure speed choice: same outputs and grads.
    import kernels

    torch.manual_seed(0)
    E, F, D = 4, 12, 16
    cfgs = {fuse: kernels.GroupedExpertsMM.Config(dim=D, hidden_dim=F, num_experts=E, gemm_dtype="float32",
                                                  fuse_gate_up=fuse) for fuse in (False, True)}
    two, one = cfgs[False].build(), cfgs[True].build()
    for w in ("w1_EFD", "w2_EDF", "w3_EFD"):
        torch.nn.init.normal_(getattr(two, w), std=0.2)
    one.load_state_dict(two.state_dict())
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = two(xa, counts), one(xb, counts)
    (ya.square().sum()).backward()
    (yb.square().sum()).backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for w in ("w1_EFD", "w2_EDF", "w3_EFD"):
        torch.testing.assert_close(getattr(two, w).grad, getattr(one, w).grad, rtol=1e-5, atol=1e-6)
