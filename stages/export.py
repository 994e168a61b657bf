"""Export a kit checkpoint to the released Hugging Face layout (issue 10): config -> checkpoint -> write.

    python stages/export.py                          # last finished stage of the smoke chain -> runs/<model>/hf/<stage>
    python stages/export.py ckpt=rl out=/tmp/axk1-hf dtype=float32
    make export CKPT=runs/tiny/rl/checkpoints/step-00000040 OUT=/tmp/axk1-hf
    python stages/export.py --cfg job --resolve   # prints the fully composed config, runs nothing

The folder loads with transformers' AutoModelForCausalLM / AXK1ForCausalLM and vLLM's AXK1
(`make serve`). Streaming, no process group: see hf_io's docstring for the memory bound.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kit import checkpoint_tokenizer, hf_io  # noqa: E402


def run(cfg: DictConfig) -> dict:
    ckpt, name = hf_io.resolve_checkpoint(cfg.ckpt, cfg.stages, Path(cfg.paths.runs) / cfg.model.name)
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.runs) / cfg.model.name / "hf" / name
    tok_dir = checkpoint_tokenizer.tokenizer_of(ckpt, cfg.tokenizer_dir)  # the ids the weights were trained on
    print(f"[export] {ckpt} -> {out} ({cfg.dtype}), tokenizer {checkpoint_tokenizer.describe(tok_dir)}", flush=True)
    stats = hf_io.export_hf(ckpt, out, cfg.model, tok_dir, dtype=cfg.dtype,
                            max_shard_bytes=int(float(cfg.max_shard_gib) * 2**30))
    return {"checkpoint": str(ckpt), "tokenizer_sha256": checkpoint_tokenizer.tokenizer_hash(tok_dir), **stats}


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        print(json.dumps(run(cfg)), flush=True)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"[export] {e}")


if __name__ == "__main__":
    main()
