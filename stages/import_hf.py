"""Import a released-layout Hugging Face folder as a kit DCP checkpoint (issue 10).

    python stages/import_hf.py hf=/path/to/A.X-K1 out=runs/axk1_519b/released model=axk1_519b
    make import HF=/path/to/A.X-K1 OUT=runs/axk1_519b/released MODEL=axk1_519b
    make post MODEL=axk1_519b ARGS="++base_stage=runs/axk1_519b/released ++checkpoints.base=runs/axk1_519b/released"
    python stages/import_hf.py hf=/path/to/A.X-K1 out=runs/axk1_519b/released model=axk1_519b --cfg job --resolve   # prints the fully composed config, runs nothing

The folder must describe the model config exactly: config.json fields, and every tensor by name
and shape (router biases included); the first difference stops the import with one line naming
the field or tensor, and nothing is written. The folder's tokenizer files and chat template are
copied beside the weights (`<out>/tokenizer/`): every stage starting from the import encodes with
them (kit/checkpoint_tokenizer.py).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from kit import hf_io  # noqa: E402


@hydra.main(config_path="../conf", config_name="import_hf", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        print(json.dumps(hf_io.import_hf(cfg.hf, cfg.out, cfg.model)), flush=True)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"[import] {e}")


if __name__ == "__main__":
    main()
