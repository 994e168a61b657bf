"""Worker for tests/test_device_placement.py: one pre-training step, one RL step and one
evaluation decode of the tiny model on a device that is not the CPU, without a GPU.

The model lives on the meta device of a 2-rank world on torch's fake process group (the dry run's
set-up: stages/dryrun.py). A dispatch mode, DevicePolice, sees every aten and c10d call and fails
where a GPU run would: a collective given a tensor off the model's device (NCCL takes GPU tensors
only), or an op mixing a CPU tensor with the model's (CUDA refuses that too; 0-dim CPU tensors
pass, as CUDA takes them as scalars). Reads of values (.item(), .tolist(), .cpu()) are legal host
syncs on a GPU; meta tensors have no values, so the mode answers them with ones.

Exit 0 and one line `DEVICE-OK {...}`; otherwise the first misplaced tensor's line (`DEVICE-FAIL`).
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx.experimental._config
from hydra import compose, initialize_config_dir
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from kit import chat_data
from kit import config_checks  # noqa: F401  (config resolvers)
from kit import kv_decoding
from kit import training
import tokenizer as tokmod

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("meta")
COLLECTIVES = ("c10d", "_c10d_functional")
aten = torch.ops.aten


class Misplaced(RuntimeError):
    pass


def caller(depth: int = 2) -> str:
    """The `depth` innermost frames of this repository's code (not torch's, not this file's),
    innermost first."""
    frames = [f for f in reversed(traceback.extract_stack()) if ROOT in Path(f.filename).parents
              and ".venv" not in Path(f.filename).parts and Path(f.filename).name != Path(__file__).name]
    return " < ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}: {f.line}"
                      for f in frames[:depth]) or "?"


class DevicePolice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.collectives = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.namespace in COLLECTIVES:
            self.collectives += 1
            off = sorted({str(t.device) for t in tensors if t.device != DEVICE})
            if off:
                raise Misplaced(f"{func} got a tensor on {', '.join(off)} (the model is on {DEVICE}) at {caller()}")
        else:
            on_model = any(t.device == DEVICE for t in tensors)
            cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if on_model and cpu:
                raise Misplaced(f"{func} mixes a CPU tensor {tuple(cpu[0].shape)} with the model's "
                                f"{DEVICE} tensors at {caller()}")
        meta_in = tensors and tensors[0].device == DEVICE
        if func is aten._local_scalar_dense.default and meta_in:  # .item(), float(), bool()
            t = tensors[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        if func is aten._to_copy.default and meta_in and torch.device(kwargs.get("device") or DEVICE).type == "cpu":
            return torch.ones(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)  # .cpu(), .tolist()
        return func(*args, **kwargs)


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def pretrain_step(cfg, parts, pipe, opts, pdims) -> None:
    """stages/pretrain.py's loop body: targets, global counts, train_step, optimizer_step."""
    g = torch.Generator().manual_seed(0)
    rows, seq = 4, 32
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq + 1), generator=g)
    positions = torch.cat([torch.arange(seq // 2), torch.arange(seq // 2)]).repeat(rows, 1)  # two documents
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "positions": positions}
    loss_mesh = pdims.get_optional_mesh("loss")
    loss_group = loss_mesh.get_group() if loss_mesh is not None else None
    targets = training.loss_labels(batch["labels"], batch["positions"], cfg.model.num_mtp_layers)
    n_targets = training.global_target_counts(targets, loss_group, DEVICE)
    sums = training.train_step(parts, pipe, batch, targets, n_targets, micro=2, mtp_scale=cfg.stage.mtp_scale,
                               dp_size=pdims.dp_shard, device=DEVICE)
    training.optimizer_step(parts, pipe, opts, cfg.optim.grad_clip, pdims, loss_group)
    (sums[:2] / n_targets.clamp(min=1)).tolist()


def rl_step(cfg, net, opt, pdims, tok) -> None:
    """stages/rl_train.py: weights to the local rollout backend on the trainer's device, a batched
    sample, the old log-probs and one GSPO policy step."""
    from stages import rl_train as rl_stage
    import rl

    R = compose_cfg("rl_train", ["parallelism=none"]).stage.rl
    rollouts = kv_decoding.LocalRollouts(cfg.model, tok.pad_token_id, training.device_of(cfg.hardware))
    rollouts.load(net)
    prompts = [[5, 6, 7], [8, 9]]
    outs = rollouts.sample(prompts, max_new_tokens=3, eos_id=tok.eos_token_id, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))
    seqs = [p + o.tokens for p, o in zip(prompts, outs)]
    with torch.no_grad():
        old = rl_stage.token_logprobs(net, seqs, tok.pad_token_id)
    T = max(len(s) for s in seqs) - 1
    mask = torch.ones(len(seqs), T)
    adv = rl.group_advantages(torch.tensor([1.0, -1.0]), 2)
    rl_stage.policy_step(net, opt, seqs, mask, old[:, :T], adv, R, cfg.optim.grad_clip, pdims.dp_shard,
                         tok.pad_token_id, pdims)


def evaluation(tok) -> None:
    """stages/evaluate.py on the decode model its run() builds: greedy decode and held-out NLL."""
    from stages import evaluate

    ecfg = compose_cfg("evaluate", ["max_new_tokens=3", "batch_size=2", "sampled.n=0"])
    ecfg.device = DEVICE.type
    net = kv_decoding.build_inference_model(ecfg.model, training.device_of(ecfg))
    records, _ = chat_data.load_posttrain(ecfg.posttrain_data, "eval")
    evaluate.evaluate_checkpoint(net, tok, records[:2], ecfg)


def meta_as_accelerator() -> None:
    """Meta in cuda's place where torch asks for an accelerator: FSDP2 takes its device from the
    mesh's device type (cuda:<current> on GPUs; the fake world's meshes are CPU ones) and a device
    handle for its streams and events (the CPU's no-op ones; DeviceMesh asks too), and refuses to gather parameters
    left on meta (a guard against forgetting to materialise them; here meta is the run's device);
    torchtitan's router opens an autocast region on the input's device type (none for meta); the
    foreach kernels (clipping, AdamW) are offered to accelerators only."""
    from torch.distributed.fsdp._fully_shard import _fully_shard
    from torch.utils import _foreach_utils
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    _fully_shard._get_device_from_mesh = lambda mesh: DEVICE
    torch.meta = torch.cpu
    FSDPParamGroup._validate_no_meta_params = lambda self: None

    class Autocast(torch.autocast):
        def __init__(self, device_type, *args, **kwargs):
            if device_type == DEVICE.type:  # no values to compute: autocast off
                device_type, kwargs = "cpu", {**kwargs, "enabled": False}
            super().__init__(device_type, *args, **kwargs)
    torch.autocast = Autocast
    torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = True  # boolean indexing: every element set
    accelerators = _foreach_utils._get_foreach_kernels_supported_devices()
    _foreach_utils._get_foreach_kernels_supported_devices = lambda: [*accelerators, DEVICE.type]


def main() -> None:
    meta_as_accelerator()
    cfg = compose_cfg("pretrain", ["parallelism=none", "hardware=cpu", "run_dir=/tmp/unused"])
    cfg.hardware.device = DEVICE.type  # what device_of hands the stages
    cfg.hardware.expert_gemm_dtype = "bfloat16"  # as on GPUs (h200_node.yaml): CUDA's grouped GEMM is bf16-only
    world = 2
    training._patch_torchtitan_device(DEVICE.type)  # torchtitan's meshes on the run's device, as cuda ones on GPUs
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    parts, pipe, spec, pdims, _ = training.build_model_parts(cfg, world, bias_update_rate=1e-3, seed=0, meta=True)
    opts = [training.build_optimizer(part, cfg.optim, spec, pdims) for part in parts]
    tok = tokmod.load_tokenizer(str(ROOT / "artifacts" / "tokenizer" / "tiny"))
    police, done = DevicePolice(), []
    try:  # the police itself: a CPU tensor given to a collective must be stopped
        with police:
            dist.all_reduce(torch.zeros(2))
        sys.exit("DEVICE-FAIL: the check let a CPU tensor into all_reduce")
    except Misplaced:
        pass
    try:
        with police:
            for name, step in (("pretrain", lambda: pretrain_step(cfg, parts, pipe, opts, pdims)),
                               ("rl", lambda: rl_step(cfg, parts[0], opts[0], pdims, tok)),
                               ("evaluate", lambda: evaluation(tok))):
                step()
                done.append(name)
    except Misplaced as e:
        print(f"DEVICE-FAIL after {done or 'nothing'}: {e}", flush=True)
        sys.exit(1)
    print("DEVICE-OK " + json.dumps({"steps": done, "collectives": police.collectives}), flush=True)
    # every rank done with its collectives before teardown: gloo can abort a rank whose peer
    # destroys the group while its own work is still in flight ('terminate called', seen once in CI)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
