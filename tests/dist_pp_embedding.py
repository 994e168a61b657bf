"""Worker for tests/test_pipeline.py (torchrun, 2 gloo ranks, PP 2): the last stage's MTP
embedding copy against the first stage's embedding. Three optimizer steps through the real seam
(training.train_step, clipping, AdamW) must leave them equal; one step with the gradient sum
switched off must make them differ, and the pre-checkpoint check must then refuse. Prints one
JSON line (PPCHECK ...) on rank 0."""

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
from kit import checkpoints  # noqa: E402
from kit import config_checks  # noqa: E402,F401  (config resolvers)
from kit import training  # noqa: E402

with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
    cfg = compose("pretrain", overrides=["parallelism=cpu_pp", "run_dir=/tmp/unused"])
rank, world = training.init_distributed(cfg.hardware)
parts, pipe, spec, pdims, _ = training.build_model_parts(cfg, world, bias_update_rate=1e-3, seed=0)
opts = [training.build_optimizer(part, cfg.optim, spec, pdims) for part in parts]
for group in (g for opt in opts for g in opt.param_groups):
    group["lr"] = 1e-2  # large steps: any difference between the copies shows at once

gen = torch.Generator().manual_seed(1)


def step() -> None:
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=gen)
    positions = torch.arange(32).repeat(4, 1)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "positions": positions}
    targets = training.loss_labels(batch["labels"], positions, cfg.model.num_mtp_layers)
    training.train_step(parts, pipe, batch, targets, training.count_targets(targets, torch.device("cpu")), micro=2,
                        mtp_scale=0.3, dp_size=1, device=torch.device("cpu"))
    training.clip_grad_norm(parts, pipe, cfg.optim.grad_clip, pdims)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


result = {"initial": pipe.embedding_drift()}
for _ in range(3):
    step()
result["after_3_steps"] = pipe.embedding_drift()
checkpoints.check_embedding_copy(pipe, "drill")  # must pass

pipe.sync_embedding_grads = lambda: None  # negative control: each copy keeps only its own gradient
step()
result["unsynced"] = pipe.embedding_drift()
try:
    checkpoints.check_embedding_copy(pipe, "drill")
    result["refused"] = False
except RuntimeError as e:
    result["refused"] = "drifted" in str(e)
if rank == 0:
    print("PPCHECK " + json.dumps(result), flush=True)
# every rank done with its collectives before teardown: gloo can abort a rank whose peer
# destroys the group while its own work is still in flight ('terminate called', seen once in CI)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
