"""Worker for tests/test_vllm_rollout.py (torchrun, 2 gloo ranks, FSDP2 x EP 2): the RL weight push
(vllm_engine.write_hf_shards) from the sharded trainer, gathered one tensor at a time with small
shards so stacked experts span shard borders, must equal the released-layout tensors of the full
state dict (hf_io.kit_to_hf_state, the export's mapping). Prints one JSON line (PUSHCHECK ...) on rank 0."""

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

ROOT = Path(__file__).resolve().parents[1]
from kit import config_checks  # noqa: E402,F401  (config resolvers)
from kit import hf_io  # noqa: E402
from kit import training  # noqa: E402
from kit import vllm_engine  # noqa: E402

out = Path(sys.argv[1])
with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
    cfg = compose("rl_train", overrides=["parallelism=cpu_fsdp_ep", f"run_dir={out}"])
rank, world = training.init_distributed(cfg.hardware)
net, spec, pdims, _ = training.build_model(cfg, world, bias_update_rate=0.0, seed=0)
with torch.no_grad():  # a router bias that is not all zeros, different on every layer
    for name, buf in net.named_buffers():
        if name.endswith("expert_bias_E"):
            buf.copy_(torch.linspace(-0.1, 0.1, buf.numel()).view_as(buf) * (1 + len(name) % 3))
stats = vllm_engine.write_hf_shards(net, cfg.model, out / "push", torch.float32, max_shard_bytes=2**20,
                                    rank=rank, config={"probe": True})
full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))  # collective, every rank
if rank == 0:
    want = hf_io.kit_to_hf_state({k: v.detach() for k, v in full.items()}, cfg.model, torch.float32)
    got = {}
    for f in sorted((out / "push").glob("*.safetensors")):
        got.update(load_file(str(f)))
    index = json.loads((out / "push" / "model.safetensors.index.json").read_text())
    print("PUSHCHECK " + json.dumps({
        "names_equal": sorted(got) == sorted(want) == sorted(index["weight_map"]),
        "max_abs_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
        "sharded_params": sum(hasattr(p, "full_tensor") for p in net.parameters()),
        "bias_nonzero": any(k.endswith("e_score_correction_bias") and float(v.abs().sum()) > 0 for k, v in got.items()),
        "config": json.loads((out / "push" / "config.json").read_text()), "shards": stats["shards"]}), flush=True)
