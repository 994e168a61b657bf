"""Kit checkpoints <-> the released Hugging Face layout of A.X K1 (`AXK1ForCausalLM`).

    export_hf(ckpt_dir, out_dir, model_cfg, tokenizer_dir)   # DCP checkpoint -> HF folder
    import_hf(hf_dir, out_ckpt, model_cfg)                   # HF folder -> DCP checkpoint (stage.init_from)
    kit_to_hf_state(tensors, model_cfg)                      # in memory, e.g. a policy push to vLLM

Tensor names are torchtitan's DeepSeek-V3 <-> HF map (`DeepSeekV3StateDictAdapter.from_hf_map`)
plus A.X K1's one delta, the post-MoE RMSNorm, which the released checkpoint and vLLM store at the
decoder-layer level as `post_mlp_layernorm`. vLLM builds that norm on every layer, dense layer 0
included (unused there), so the export writes ones for it. The MTP layer follows DeepSeek-V3's
convention: decoder-layer index `num_hidden_layers`, with `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm` and copies of the shared `embed_tokens` / `shared_head.head`.

Streaming, both ways. Export reads, per output shard, only the rows of the kit tensors that shard
holds (DCP's own read planner, restricted to a row range), so whatever layout wrote the checkpoint
(FSDP, EP, PP) DCP reassembles the rows from its metadata, and no process group is needed. Peak
memory: one output shard + one row box of a kit tensor in its stored dtype + one saved DCP chunk
(the largest piece one training rank wrote); never the whole model. Import writes one DCP file per
kit tensor and materialises each tensor only when DCP writes it: peak is one kit tensor (a layer's
stacked experts) plus the per-expert tensors it is built from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)
from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter

import merge
import model as axk1
import tokenizer as tokmod
from kit import checkpoint_tokenizer, checkpoints
from kit.progress_bar import progress

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message=".*process group is not initialized.*")

ARCH = "AXK1ForCausalLM"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # transformers keeps these fp32

# conf/model/*.yaml field -> the released config.json field (transformers' AXK1Config).
CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "dense_hidden_dim": "intermediate_size",
    "moe_hidden_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts", "top_k": "num_experts_per_tok",
    "n_group": "n_group", "topk_group": "topk_group", "route_scale": "routed_scaling_factor",
    "route_norm": "norm_topk_prob", "norm_eps": "rms_norm_eps", "init_std": "initializer_range",
    "max_seq_len": "max_position_embeddings", "n_dense_layers": "first_k_dense_replace",
    "num_mtp_layers": "num_nextn_predict_layers",
}


class HFError(ValueError):
    """A folder or checkpoint that does not match the model config: one line naming the tensor/field."""


# ----------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------
def hf_config(m: DictConfig, tok_meta: dict | None = None, dtype: str = "bfloat16") -> dict:
    """The released config.json for the kit model config `m` (transformers' AXK1Config fields)."""
    from transformers.models.axk1 import AXK1Config

    if m.score_func != "sigmoid":
        raise HFError(f"model.score_func={m.score_func}: AXK1ForCausalLM routes with sigmoid scores only")
    if m.q_lora_rank == 0:
        raise HFError("model.q_lora_rank=0: AXK1ForCausalLM always has a query LoRA")
    fields = {hf: m[kit] for kit, hf in CONFIG_FIELDS.items() if hf not in ("first_k_dense_replace",
                                                                          "num_nextn_predict_layers")}
    ids = tok_meta or {}
    cfg = AXK1Config(
        **fields, num_key_value_heads=m.n_heads, hidden_act="silu", tie_word_embeddings=False,
        mlp_layer_types=["dense" if i < m.n_dense_layers else "sparse" for i in range(m.n_layers)],
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)}, rope_interleave=True,
        attention_bias=False, bos_token_id=ids.get("bos_id"), eos_token_id=ids.get("eos_id"),
        pad_token_id=ids.get("pad_id"),
    )
    out = cfg.to_dict()
    # vLLM's AXK1/DeepSeek code reads the legacy layer-pattern fields and the MTP depth by these names.
    out.update(architectures=[ARCH], first_k_dense_replace=m.n_dense_layers, moe_layer_freq=1,
               num_nextn_predict_layers=m.num_mtp_layers, dtype=dtype)
    return out


def check_hf_config(cfg: dict, m: DictConfig, where: str) -> None:
    """Refuse a config.json that describes another model than `m`, naming the first field that differs."""
    if ARCH not in (cfg.get("architectures") or []):
        raise HFError(f"{where}: architectures={cfg.get('architectures')}: expected [{ARCH}]")
    want = hf_config(m)
    layer_types = cfg.get("mlp_layer_types")
    if layer_types is not None and "first_k_dense_replace" not in cfg:
        cfg = {**cfg, "first_k_dense_replace": next((i for i, t in enumerate(layer_types) if t == "sparse"),
                                                    len(layer_types))}
    cfg = {**cfg, "num_nextn_predict_layers": cfg.get("num_nextn_predict_layers", 0)}
    for kit, hf in CONFIG_FIELDS.items():
        got, exp = cfg.get(hf), want[hf]
        if got is None or (float(got) != float(exp) if isinstance(exp, float) else got != exp):
            raise HFError(f"{where} {hf}={got}: expected {exp} (model.{kit} of conf/model/{m.name}.yaml)")
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    rope_type = (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get("rope_type", "default")
    if theta is None or float(theta) != float(m.rope_theta) or rope_type != "default":
        raise HFError(f"{where} rope_parameters: theta {theta} type {rope_type}: expected {m.rope_theta} default")


# ----------------------------------------------------------------------------------------
# Tensor names: one plan shared by export, import and kit_to_hf_state.
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    hf: str                    # released tensor name
    kit: str | None            # kit state-dict key; None: a constant (dense layers' unused post_mlp_layernorm)
    expert: int | None         # row of a stacked expert tensor
    shape: tuple[int, ...]     # shape of the released tensor
    alias: bool = False        # a copy of a shared kit tensor (MTP embed_tokens / shared_head.head)


def kit_shapes(m: DictConfig) -> dict[str, tuple[int, ...]]:
    """The kit model's state-dict keys and shapes, from a meta-device build (nothing allocated)."""
    with torch.device("meta"):
        net = axk1.build_model_config(m, attention="sdpa").build()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _name_map(m: DictConfig) -> dict[str, str]:
    """kit abstract key ('layers.{}.x') -> released abstract name, from torchtitan's adapter."""
    adapter = DeepSeekV3StateDictAdapter(axk1.build_model_config(m, attention="sdpa"), None)
    names = {kit: hf for hf, kit in adapter.from_hf_map.items()}
    names["layers.{}.post_moe_norm.weight"] = "model.layers.{}.post_mlp_layernorm.weight"  # dual norm
    return names


def hf_plan(m: DictConfig) -> list[Entry]:
    names, shapes, plan = _name_map(m), kit_shapes(m), []
    for key, shape in shapes.items():
        hit = re.match(r"(mtp_layers|layers)\.(\d+)\.(.*)", key)
        if hit is None:
            plan.append(Entry(names[key], key, None, shape))
            continue
        kind, idx, rest = hit.groups()
        layer = int(idx) + (m.n_layers if kind == "mtp_layers" else 0)
        template = names.get(f"layers.{{}}.{rest}")
        if template is None:
            raise HFError(f"kit tensor {key}: no released name for it (hf_io._name_map)")
        if ".inner_experts." in key:
            plan += [Entry(template.format(layer, e), key, e, shape[1:]) for e in range(shape[0])]
        else:
            plan.append(Entry(template.format(layer), key, None, shape))
    for i in range(m.n_dense_layers):  # vLLM's AXK1 builds this norm on dense layers too
        plan.append(Entry(f"model.layers.{i}.post_mlp_layernorm.weight", None, None, (m.dim,)))
    for j in range(m.num_mtp_layers):  # DeepSeek-V3 stores the shared embedding/head with each MTP layer
        n = m.n_layers + j
        plan.append(Entry(f"model.layers.{n}.embed_tokens.weight", "tok_embeddings.weight", None,
                          shapes["tok_embeddings.weight"], alias=True))
        plan.append(Entry(f"model.layers.{n}.shared_head.head.weight", "lm_head.weight", None,
                          shapes["lm_head.weight"], alias=True))
    return plan


def out_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_SUFFIXES) else dtype


def kit_to_hf_state(tensors: dict[str, torch.Tensor], m: DictConfig, dtype: torch.dtype | None = None) -> dict:
    """Released names for a full (unsharded) kit state dict; views unless `dtype` asks for a cast."""
    out = {}
    for e in hf_plan(m):
        t = torch.ones(e.shape) if e.kit is None else tensors[e.kit]
        t = t if e.expert is None else t[e.expert]
        out[e.hf] = t if dtype is None else t.to(out_dtype(e.hf, dtype))
    return out


# ----------------------------------------------------------------------------------------
# DCP: read row ranges of single tensors, without a process group, whatever layout saved them.
# ----------------------------------------------------------------------------------------
class _RowsPlanner(DefaultLoadPlanner):
    """DCP's load planner, asking for rows [start, start + len) of dim 0 of each target tensor."""

    def __init__(self, starts: dict[str, int]):
        super().__init__(flatten_state_dict=False)
        self.starts = starts

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, t in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size([self.starts[fqn]] + [0] * (t.dim() - 1)), sizes=t.size())
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]


class DCPReader:
    def __init__(self, ckpt: str | Path):
        self.path = Path(ckpt)
        self.tensors = merge.model_entries(self.path)  # {fqn: metadata}; refuses a non-DCP folder
        self.reader = dcp.FileSystemReader(str(self.path))

    def check(self, shapes: dict[str, tuple]) -> None:
        for key, shape in shapes.items():
            if key not in self.tensors:
                raise HFError(f"{self.path}: checkpoint lacks model tensor {key} (another model config?)")
            if tuple(self.tensors[key].size) != shape:
                raise HFError(f"{self.path}: model tensor {key} has shape {tuple(self.tensors[key].size)}: "
                              f"expected {shape} from the model config")
        extra = sorted(set(self.tensors) - set(shapes))
        if extra:
            raise HFError(f"{self.path}: unexpected model tensor {extra[0]} ({len(extra)} in all): another model config?")

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        md = self.tensors[key]
        out = torch.empty((stop - start, *md.size[1:]), dtype=md.properties.dtype)
        dcp.load({f"model.{key}": out}, storage_reader=self.reader, planner=_RowsPlanner({f"model.{key}": start}))
        return out


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------
def shard_plan(plan: list[Entry], dtype: torch.dtype, max_bytes: int) -> list[list[Entry]]:
    shards, cur, size = [], [], 0
    for e in plan:
        n = torch.Size(e.shape).numel() * out_dtype(e.hf, dtype).itemsize
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    return shards + ([cur] if cur else [])


def _write_tokenizer(tokenizer_dir: str | Path, out: Path, meta: dict) -> None:
    """The checkpoint's tokenizer files, byte for byte (its hash survives the export), with the
    chat template (thinking switch `enable_thinking`) in both places transformers/vLLM look:
    chat_template.jinja and tokenizer_config.json's `chat_template`."""
    checkpoint_tokenizer.copy_files(tokenizer_dir, out)
    template = tokmod.load_tokenizer(tokenizer_dir).chat_template  # the kit's own, or the import's as it came
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(template, str):
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        (out / "chat_template.jinja").write_text(template)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": meta["bos_id"], "eos_token_id": meta["eos_id"], "pad_token_id": meta["pad_id"]}, indent=2))


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, model_cfg: DictConfig, tokenizer_dir: str | Path,
              dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write the released layout of a kit DCP checkpoint into out_dir (built beside it, then renamed)."""
    t0, want = time.perf_counter(), DTYPES[dtype]
    m = model_cfg
    src = DCPReader(ckpt_dir)
    src.check(kit_shapes(m))
    meta = checkpoint_tokenizer.read_meta(tokenizer_dir)
    if meta["vocab_size"] > m.vocab_size:  # a released vocab may be smaller than its (padded) embedding
        raise HFError(f"{tokenizer_dir}: vocab_size {meta['vocab_size']}: expected at most {m.vocab_size} "
                      f"(model.vocab_size)")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    shards = shard_plan(hf_plan(m), want, max_shard_bytes)
    weight_map, total, peak = {}, 0, 0
    for i, shard in progress(list(enumerate(shards)), desc="[export] safetensors shards", unit="shard"):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors, held = {}, 0
        by_key: dict[str | None, list[Entry]] = {}
        for e in shard:
            by_key.setdefault(e.kit, []).append(e)
        for key, entries in by_key.items():  # one row box per kit tensor, dropped before the next
            if key is None:
                for e in entries:
                    tensors[e.hf] = torch.ones(e.shape, dtype=want)
                continue
            experts = [e.expert for e in entries if e.expert is not None]
            lo, hi = (min(experts), max(experts) + 1) if experts else (0, src.tensors[key].size[0])
            box = src.rows(key, lo, hi)
            peak = max(peak, held + box.nbytes)
            for e in entries:
                t = box if e.expert is None else box[e.expert - lo]
                tensors[e.hf] = t.to(out_dtype(e.hf, want), copy=True)  # owns its memory: the box goes
                held += tensors[e.hf].nbytes
            del box
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        total += held
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config(m, meta, dtype), indent=2))
    _write_tokenizer(tokenizer_dir, tmp, meta)
    (tmp / "axk1_export.json").write_text(json.dumps({"source": str(Path(ckpt_dir).resolve()), "dtype": dtype,
                                                      "model": m.name, "tokenizer_dir": str(tokenizer_dir),
                                                      "tokenizer_sha256": checkpoint_tokenizer.tokenizer_hash(tokenizer_dir)},
                                                     indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"out": str(out), "shards": len(shards), "bytes": total, "seconds": time.perf_counter() - t0,
            "peak_held_bytes": peak}


def resolve_checkpoint(ckpt: str | None, stages: list[str], runs: Path) -> tuple[Path, str]:
    """(DCP dir, name) for `ckpt` (a checkpoint dir, a run dir or a stage name under `runs`), or for
    the first finished stage of `stages` (conf/export.yaml lists the smoke chain, last stage first)."""
    for name in [ckpt] if ckpt else list(stages):
        p = Path(str(name))
        if (p / ".metadata").exists():
            return p, p.name
        for run in (runs / str(name), p):
            latest = checkpoints.latest_checkpoint(run) if run.is_dir() else None
            if latest is not None and (run == p or (run / "DONE.json").exists()):
                return latest, run.name
    where = f"ckpt={ckpt}" if ckpt else f"none of stages={list(stages)} has finished"
    raise FileNotFoundError(f"conf/export.yaml {where}: no DCP checkpoint under {runs}")


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------
def _hf_index(hf_dir: Path) -> dict[str, Path]:
    """Released tensor name -> safetensors file, via the index file or the files' own headers."""
    idx = hf_dir / "model.safetensors.index.json"
    if idx.is_file():
        return {k: hf_dir / f for k, f in json.loads(idx.read_text())["weight_map"].items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HFError(f"{hf_dir}: no model.safetensors.index.json and no *.safetensors files")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as sf:
                out.update({k: f for k in sf.keys()})
        except Exception as e:
            raise HFError(f"{f}: not a readable safetensors file: {e}") from e
    return out


class _HFSource:
    """Reads single released tensors on demand (safetensors maps the files; nothing else is held)."""

    def __init__(self, hf_dir: Path):
        self.dir, self.index = hf_dir, _hf_index(hf_dir)

    def _read(self, name: str, fn):
        try:
            with safe_open(str(self.index[name]), "pt") as sf:
                return fn(sf)
        except Exception as e:  # a truncated/corrupt file: name the tensor, not just the file
            raise HFError(f"{self.index[name]}: cannot read tensor {name}: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name, lambda sf: sf.get_slice(name).get_shape()))

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, lambda sf: sf.get_tensor(name))


def import_hf(hf_dir: str | Path, out_ckpt: str | Path, model_cfg: DictConfig) -> dict:
    """A released-layout folder -> a kit DCP checkpoint (model weights + router biases, fp32)."""
    t0, m, hf_dir = time.perf_counter(), model_cfg, Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise HFError(f"{hf_dir}: no config.json")
    check_hf_config(json.loads(cfg_path.read_text()), m, str(cfg_path))
    src, plan, shapes = _HFSource(hf_dir), hf_plan(m), kit_shapes(m)
    for e in plan:
        if e.hf not in src.index:
            raise HFError(f"{hf_dir}: missing tensor {e.hf} (kit {e.kit})")
        if src.shape(e.hf) != tuple(e.shape):
            raise HFError(f"{hf_dir}: tensor {e.hf} has shape {src.shape(e.hf)}: expected {tuple(e.shape)}")
    extra = sorted(set(src.index) - {e.hf for e in plan})
    if extra:
        raise HFError(f"{hf_dir}: unexpected tensor {extra[0]} ({len(extra)} in all): not part of model {m.name}")
    by_key: dict[str, list[Entry]] = {}
    for e in plan:
        if e.kit is not None and not e.alias:
            by_key.setdefault(e.kit, []).append(e)
    for a in (e for e in plan if e.alias):  # the kit's MTP layer shares these: the copies must be identical
        main = by_key[a.kit][0].hf
        if not torch.equal(src.get(a.hf), src.get(main)):
            raise HFError(f"{hf_dir}: tensor {a.hf} differs from {main}; the kit's MTP layer shares it")

    bar = progress(total=len(shapes), desc="[import] tensors", unit="tensor")

    def fetch(key: str) -> torch.Tensor:
        bar.update()
        entries = by_key[key]
        if entries[0].expert is None:
            return src.get(entries[0].hf).float()
        return torch.stack([src.get(e.hf).float() for e in sorted(entries, key=lambda e: e.expert)])

    out = Path(out_ckpt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plan_sd = {"model": {k: torch.empty(s, dtype=torch.float32, device="meta") for k, s in shapes.items()}}
    # One file per tensor: DCP's file writer keeps every tensor of a file alive until it closes the file.
    writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1, per_thread_copy_ahead=0)
    try:
        dcp.save(plan_sd, storage_writer=writer, planner=merge.LazySavePlanner(fetch))
        bar.close()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        ours = [f for f in getattr(e, "failures", {}).values() if isinstance(f, HFError)]  # DCP wraps it
        raise (ours[0] if ours else e)
    try:  # the ids the weights were trained on: the folder's own tokenizer and chat template
        tok = checkpoint_tokenizer.import_tokenizer(hf_dir, tmp)
    except (ValueError, FileNotFoundError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tok["meta"]["vocab_size"] > m.vocab_size:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HFError(f"{hf_dir}/tokenizer.json: vocab_size {tok['meta']['vocab_size']}: expected at most "
                      f"{m.vocab_size} (model.vocab_size)")
    (tmp / "axk1_import.json").write_text(json.dumps({"source": str(hf_dir.resolve()), "model": m.name,
                                                      "tokenizer_sha256": tok["sha256"]}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"out": str(out), "tensors": len(shapes), "seconds": time.perf_counter() - t0,
            "tokenizer_sha256": tok["sha256"], "think_tags": tok["meta"].get("think_tags")}
