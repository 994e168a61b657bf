"""kv_decoding.py: KV-cached decoding equals the uncached model's greedy argmax; weight sync."""

import torch

from kit import kv_decoding
import model as axk1


def _net(seed: int):
    torch.manual_seed(seed)
    cfg = axk1.load_model_cfg("tiny")
    net = kv_decoding.build_inference_model(cfg)
    with torch.no_grad():  # spread the logits so greedy choices are not float-noise ties
        net.lm_head.weight.mul_(20)
    return net


def test_cached_greedy_equals_uncached_argmax():
    net = _net(0)
    prompts = [[5, 17, 33, 2001, 7], [9, 3000], [44, 45, 46, 47, 48, 49, 50, 51]]
    eos = 1
    cached = kv_decoding.generate(net, prompts, max_new_tokens=12, eos_id=eos, pad_id=2, temperature=0.0)
    for p, got in zip(prompts, cached):
        want = kv_decoding.generate_uncached(net, p, max_new_tokens=12, eos_id=eos)
        assert got.tokens == want
        assert got.truncated == (want[-1] != eos)
    # alone in a batch (no padding) gives the same tokens as inside a padded batch
    assert kv_decoding.generate(net, prompts[1:2], max_new_tokens=12, eos_id=eos, pad_id=2, temperature=0.0)[0].tokens \
        == cached[1].tokens


def test_sampling_is_seeded_and_stops_at_eos():
    net = _net(1)
    kw = dict(max_new_tokens=10, eos_id=1, pad_id=2, temperature=1.0)
    a = kv_decoding.generate(net, [[5, 6, 7]] * 3, generator=torch.Generator().manual_seed(3), **kw)
    b = kv_decoding.generate(net, [[5, 6, 7]] * 3, generator=torch.Generator().manual_seed(3), **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    with torch.no_grad():  # make eos the only likely token: every sample stops after one token
        net.lm_head.weight.zero_()
        net.lm_head.weight[1] = 1.0
    r = kv_decoding.generate(net, [[5, 6, 7]], max_new_tokens=10, eos_id=1, pad_id=2, temperature=0.0)[0]
    assert r.tokens == [1] and not r.truncated


def test_sync_weights_copies_everything():
    src, dst = _net(2), _net(3)
    assert not torch.equal(src.lm_head.weight, dst.lm_head.weight)
    kv_decoding.sync_weights(src, dst)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k


def test_rows_leave_the_batch_when_done():
    # pick as "eos" the 4th token row 0 would emit: row 0 finishes early, the others keep
    # decoding from a compacted cache and must still match the uncached reference
    net = _net(4)
    prompts = [[5, 17, 33], [9, 3000, 12, 13], [44, 45]]
    free = kv_decoding.generate(net, prompts, max_new_tokens=10, eos_id=-1, pad_id=2, temperature=0.0)
    eos = free[0].tokens[3]
    got = kv_decoding.generate(net, prompts, max_new_tokens=10, eos_id=eos, pad_id=2, temperature=0.0)
    assert got[0].tokens[-1] == eos and len(got[0].tokens) <= 4 and not got[0].truncated
    for p, g in zip(prompts, got):
        assert g.tokens == kv_decoding.generate_uncached(net, p, max_new_tokens=10, eos_id=eos)
