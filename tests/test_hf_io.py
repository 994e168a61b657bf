"""hf_io: kit DCP checkpoints <-> the released HF layout, checked against transformers' AXK1ForCausalLM."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT
from safetensors.torch import load_file, save_file

from kit import chat_data
from kit import kv_decoding
from kit import hf_io
import model as axk1
import tokenizer as tokmod

TOK = ROOT / "artifacts" / "tokenizer" / "tiny"
PROMPTS = ["What is 12 + 7?", "Write one sentence about rivers.", "3 * 4 = ?"]


def random_kit_model(seed: int = 0, m=None, sharpen: bool = True):
    """The tiny model with random weights and a non-zero router bias that changes routing.
    `sharpen` spreads logits and router scores (x20) so greedy and top-k choices are far from
    float-noise ties, which makes any numerical difference between two implementations visible."""
    torch.manual_seed(seed)
    m = m or axk1.load_model_cfg("tiny")
    net = kv_decoding.build_inference_model(m)
    with torch.no_grad():
        for moe in axk1.moe_layers(net):
            moe.expert_bias_E.copy_(torch.randn(m.num_experts) * (0.1 if sharpen else 0.05))
            moe.router.gate.weight.mul_(20 if sharpen else 1)
        net.lm_head.weight.mul_(20 if sharpen else 1)
    return m, net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    m, net = random_kit_model()
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(tmp / "ckpt"))
    stats = hf_io.export_hf(tmp / "ckpt", tmp / "hf32", m, TOK, dtype="float32", max_shard_bytes=2**21)
    return m, net, tmp, stats


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_export_layout_and_config(exported):
    m, _, tmp, stats = exported
    out = tmp / "hf32"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["AXK1ForCausalLM"] and cfg["model_type"] == "axk1"
    assert (cfg["hidden_size"], cfg["n_routed_experts"], cfg["num_nextn_predict_layers"]) == (m.dim, m.num_experts, 1)
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert stats["shards"] > 1 and len(set(names.values())) == stats["shards"]
    for n in ["model.layers.1.mlp.experts.15.down_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.post_mlp_layernorm.weight",
              "model.layers.0.post_mlp_layernorm.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
              "model.layers.4.enorm.weight", "model.layers.4.hnorm.weight", "model.layers.4.eh_proj.weight",
              "model.layers.4.shared_head.norm.weight", "model.layers.4.shared_head.head.weight",
              "model.layers.4.embed_tokens.weight", "model.layers.4.mlp.experts.0.gate_proj.weight"]:
        assert n in names, n
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (out / f).is_file(), f
    assert "enable_thinking" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_logits_and_experts_match_transformers(exported):
    m, net, tmp, _ = exported
    ref = hf_model(tmp / "hf32")
    kit_ids, ref_ids = [], []
    for moe in axk1.moe_layers(net)[: m.n_layers - m.n_dense_layers]:  # main layers (the MTP one is last)
        moe.router.register_forward_hook(lambda mod, a, out: kit_ids.append(out[1].reshape(-1, m.top_k)))
    for layer in ref.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda mod, a, out: ref_ids.append(out[2]))
    x = torch.randint(0, m.vocab_size, (2, 40))
    pos = torch.arange(40).repeat(2, 1)
    with torch.no_grad():
        ours = net(x, pos, net.get_attention_masks(pos))[0]
        theirs = ref(input_ids=x).logits
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"logits max |diff| / max |logit| = {rel:.2e}")
    assert rel < 1e-4
    assert len(kit_ids) == len(ref_ids) == m.n_layers - m.n_dense_layers
    for a, b in zip(kit_ids, ref_ids):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    # the bias matters: routing without it picks other experts for some tokens
    bias = [moe.expert_bias_E.clone() for moe in axk1.moe_layers(net)]
    kit_ids.clear()
    with torch.no_grad():
        for moe in axk1.moe_layers(net):
            moe.expert_bias_E.zero_()
        net(x, pos, net.get_attention_masks(pos))
        for moe, b in zip(axk1.moe_layers(net), bias):
            moe.expert_bias_E.copy_(b)
    assert any(not torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(kit_ids, ref_ids))


def test_import_of_export_is_exact(exported, tmp_path):
    m, net, tmp, _ = exported
    hf_io.import_hf(tmp / "hf32", tmp_path / "back", m)
    back = kv_decoding.build_inference_model(m)
    sd = back.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(tmp_path / "back"))
    for k, v in net.state_dict().items():
        assert torch.equal(sd[k], v), k
    # BF16 (the default) is exact up to the BF16 rounding; router weight and bias stay FP32
    hf_io.export_hf(tmp / "ckpt", tmp_path / "hf16", m, TOK)
    hf_io.import_hf(tmp_path / "hf16", tmp_path / "back16", m)
    dcp.load({"model": sd}, checkpoint_id=str(tmp_path / "back16"))
    for k, v in net.state_dict().items():
        keep = k.endswith(("router.gate.weight", "expert_bias_E"))
        assert torch.equal(sd[k], v if keep else v.bfloat16().float()), k


def test_kit_to_hf_state_equals_the_export(exported):
    m, net, tmp, _ = exported
    mem = hf_io.kit_to_hf_state(net.state_dict(), m)
    disk = {}
    for f in sorted((tmp / "hf32").glob("*.safetensors")):
        disk.update(load_file(str(f)))
    assert mem.keys() == disk.keys()
    assert all(torch.equal(mem[k], disk[k]) for k in mem)


def test_greedy_generation_both_modes_matches_transformers(exported):
    m, net, tmp, _ = exported
    ref = hf_model(tmp / "hf32")
    from transformers import AutoTokenizer
    hf_tok, kit_tok = AutoTokenizer.from_pretrained(str(tmp / "hf32")), tokmod.load_tokenizer(TOK)
    for mode in ("thinking", "non_thinking"):
        for text in PROMPTS[:2]:  # 2 prompts x 2 modes x 12 tokens: ~1 s per decoding step on a busy 2-core CPU
            msgs = [{"role": "user", "content": text}]
            ids = chat_data.encode_prompt(kit_tok, msgs, mode)
            # the exported template renders the same prompt ids with the thinking switch
            hf_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                enable_thinking=(mode == "thinking"), return_dict=False)
            assert list(hf_ids) == ids
            kit = kv_decoding.generate(net, [ids], max_new_tokens=12, eos_id=kit_tok.eos_token_id, pad_id=kit_tok.pad_token_id,
                             temperature=0)
            out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            assert out[0, len(ids):].tolist() == kit[0].tokens, (mode, text)


def _shard_of(folder, name):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.parametrize("damage, message", [
    ("drop_bias", "missing tensor model.layers.2.mlp.gate.e_score_correction_bias"),
    ("reshape", "tensor model.layers.3.self_attn.q_b_proj.weight has shape"),
    ("extra", "unexpected tensor model.layers.1.mlp.experts.16.up_proj.weight"),
    ("truncate", r"model-\d+-of-\d+.safetensors: cannot read tensor model.layers.1.mlp.experts"),
    ("config", "hidden_size=256: expected 128"),
    ("mtp_copy", "tensor model.layers.4.embed_tokens.weight differs"),
])
def test_import_refuses_damaged_folders(exported, tmp_path, damage, message):
    m, _, tmp, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "hf32", bad)
    targets = {"drop_bias": "model.layers.2.mlp.gate.e_score_correction_bias",
               "reshape": "model.layers.3.self_attn.q_b_proj.weight",
               "extra": "model.layers.1.mlp.experts.3.up_proj.weight",
               "truncate": "model.layers.1.mlp.experts.3.up_proj.weight",
               "mtp_copy": "model.layers.4.embed_tokens.weight"}
    if damage == "config":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 256}))
    else:
        name = targets[damage]
        f = _shard_of(bad, name)
        if damage == "truncate":
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])
        else:
            t = load_file(str(f))
            if damage == "drop_bias":
                del t[name]
            elif damage == "reshape":
                t[name] = t[name][:-1]
            elif damage == "extra":
                t["model.layers.1.mlp.experts.16.up_proj.weight"] = t[name].clone()
            else:
                t[name] = t[name] + 1
            save_file(t, str(f))
            index = json.loads((bad / "model.safetensors.index.json").read_text())
            index["weight_map"] = {k: f.name for k in t} | {k: v for k, v in index["weight_map"].items()
                                                             if v != f.name}
            (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf_io.HFError, match=message):
        hf_io.import_hf(bad, tmp_path / "out", m)
    assert not (tmp_path / "out").exists()  # nothing written


def test_export_refuses_a_checkpoint_of_another_config(exported, tmp_path):
    m, _, tmp, _ = exported
    other = m.copy()
    other.moe_hidden_dim = 32
    with pytest.raises(hf_io.HFError, match=r"model tensor layers.1.moe.routed_experts.inner_experts.w1_EFD has shape"):
        hf_io.export_hf(tmp / "ckpt", tmp_path / "x", other, TOK)
    assert not (tmp_path / "x").exists()


PEAK_SCRIPT = r"""
import json, sys
from kit import hf_io
import tokenizer as tokmod
from omegaconf import OmegaConf


def status(field):  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    with open("/proc/self/status") as f:
        return [int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")][0]


m = OmegaConf.create(json.loads(sys.argv[3]))
hf_io.kit_shapes(m), hf_io.hf_config(m), tokmod.load_tokenizer(sys.argv[4])  # imports before the baseline
before = status("VmRSS")
stats = hf_io.export_hf(sys.argv[1], sys.argv[2], m, sys.argv[4], dtype="bfloat16", max_shard_bytes=int(sys.argv[5]))
print(json.dumps({"rss_before": before, "peak_after": status("VmHWM"), **stats}))
"""


def test_export_peak_memory_is_bounded_by_one_shard(tmp_path):
    """Stated bound: peak RSS growth <= one output shard + one kit-tensor row box (fp32) + one saved
    DCP chunk (+ 48 MiB of allocator slack). The model here is ~200 MB fp32, far above that."""
    m = axk1.load_model_cfg("tiny")
    m.num_experts, m.moe_hidden_dim, m.dim = 64, 256, 256
    m.n_group, m.topk_group = 4, 2
    _, net = random_kit_model(0, m)
    sd = net.state_dict()
    model_bytes = sum(v.nbytes for v in sd.values())
    dcp.save({"model": sd}, checkpoint_id=str(tmp_path / "ckpt"))
    chunk = max(v.nbytes for v in sd.values())  # saved unsharded: one chunk = one whole kit tensor
    del net, sd
    shard = 16 * 2**20
    cfg = json.dumps(dict(m))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "hf"), cfg,
                          str(TOK), str(shard)], cwd=ROOT, capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
                              "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak_after"] - r["rss_before"]
    bound = shard + chunk + chunk + 48 * 2**20  # shard + row box (<= a whole fp32 tensor) + saved chunk
    print(f"model {model_bytes / 2**20:.0f} MiB fp32, export peak RSS growth {growth / 2**20:.0f} MiB, "
          f"bound {bound / 2**20:.0f} MiB, {r['shards']} shards in {r['seconds']:.1f} s")
    assert growth < bound < model_bytes


def test_imported_checkpoint_initialises_a_training_model(exported, tmp_path, single_process_group):
    """What `stage.init_from` does with the import: checkpoints.load_model_weights into the FSDP-wrapped model."""
    from kit import checkpoints
    from kit import training
    from conftest import compose_cfg
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    m, net, tmp, _ = exported
    hf_io.import_hf(tmp / "hf32", tmp_path / "init", m)
    cfg = compose_cfg(overrides=["parallelism=none"])
    trained, *_ = training.build_model(cfg, 1, bias_update_rate=0.0, seed=123)
    checkpoints.load_model_weights(tmp_path / "init", trained)
    sd = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    for k, v in net.state_dict().items():
        got = sd[k].full_tensor() if hasattr(sd[k], "full_tensor") else sd[k]
        assert torch.equal(got, v), k
