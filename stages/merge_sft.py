"""Think-Fusion merge (paper 4.3, Eq. 1): theta = alpha * theta_reasoning + (1 - alpha) * theta_instruct.

    python stages/merge_sft.py                       # runs/<model>/sft_reasoning + sft_instruct -> runs/<model>/merge
    python stages/merge_sft.py alpha=0.5 stage.reasoning_from=/path/to/dcp
    python stages/merge_sft.py --cfg job --resolve   # prints the fully composed config, runs nothing

No process group and no model build: merge.py streams the DCP checkpoints tensor by tensor, so
this runs on one host for the 519B model. Output layout is every stage's: checkpoints/step-00000000
(+ merge_manifest.json with the inputs' hashes and alpha), checkpoints/latest, DONE.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import merge
from kit import checkpoint_tokenizer, checkpoints, run_lease


def resolve_input(cfg: DictConfig, field: str) -> Path:
    """A stage name (its latest finished checkpoint) or a checkpoint path."""
    src = cfg.stage[field]
    p = Path(src)
    if p.exists():
        return p
    run = Path(cfg.paths.runs) / cfg.model.name / src
    ptr = run / "checkpoints" / "latest"
    if not (run / "DONE.json").exists() or not ptr.exists():
        raise FileNotFoundError(f"conf/merge_sft.yaml stage.{field}={src}: no finished run at {run} (run stage {src} first)")
    return run / "checkpoints" / ptr.read_text().strip()


def run(cfg: DictConfig) -> dict:
    reasoning, instruct = resolve_input(cfg, "reasoning_from"), resolve_input(cfg, "instruct_from")
    run_dir = Path(cfg.run_dir)
    lease = run_lease.take(run_dir, cfg.lease, cfg.stage.name)  # one writer per run folder, before any read or write
    if (run_dir / "DONE.json").exists() and not cfg.overwrite:  # a finished merge: kept, or refused
        made = json.loads((run_dir / "merge_manifest.json").read_text())
        if (made["alpha"], made["reasoning"]["path"], made["instruct"]["path"]) != (float(cfg.alpha), str(reasoning), str(instruct)):
            raise FileExistsError(f"{run_dir} holds a finished merge of other inputs or alpha ({made['alpha']}): "
                                  f"kept (overwrite=true replaces it)")
        print(f"[merge] {run_dir}: finished already with these inputs and alpha, kept", flush=True)
        lease.release()
        return json.loads((run_dir / "DONE.json").read_text())
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    (run_dir / "DONE.json").unlink(missing_ok=True)  # a re-run is not done until it finishes
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    out = root / "step-00000000"
    # both parents must speak one tokenizer (a weight average of two vocabularies means nothing)
    tok_dir = checkpoint_tokenizer.tokenizer_of(reasoning, cfg.tokenizer_dir)
    tok_hash = checkpoint_tokenizer.require_same(tok_dir, f"stage.reasoning_from {reasoning}",
                                                 checkpoint_tokenizer.tokenizer_of(instruct, cfg.tokenizer_dir),
                                                 f"stage.instruct_from {instruct}")
    checkpoint_tokenizer.copy_tokenizer(tok_dir, run_dir)
    manifest = merge.merge_checkpoints(reasoning, instruct, out, float(cfg.alpha), hash_inputs=bool(cfg.hash_inputs),
                                      on_tensor=lease.heartbeat)
    (run_dir / "merge_manifest.json").write_text(json.dumps(manifest, indent=2))
    checkpoints.write_atomic(root / "latest", out.name)
    summary = {"stage": cfg.stage.name, "alpha": manifest["alpha"], "n_params": manifest["n_params"],
               "output": str(out), "seconds": manifest["seconds"], "tokenizer_sha256": tok_hash, "finished": True}
    checkpoints.write_atomic(run_dir / "DONE.json", json.dumps(summary))
    lease.release()
    return summary


@hydra.main(config_path="../conf", config_name="merge_sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        print(json.dumps(run(cfg)), flush=True)
    except (merge.MergeError, FileNotFoundError, FileExistsError, checkpoint_tokenizer.TokenizerMismatch) as e:
        sys.exit(f"[merge] {e}")


if __name__ == "__main__":
    main()
