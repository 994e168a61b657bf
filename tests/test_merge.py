"""merge.py / stages/merge_sft.py: Eq. 1 elementwise on real DCP checkpoints, refusals, atomicity."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir

import merge

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def model_sd(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_embeddings.weight": torch.randn(10, 4, generator=g).to(dtype),
        "layers.1.moe.routed_experts.inner_experts.w1_EFD": torch.randn(4, 3, 4, generator=g).to(dtype),
        "layers.1.moe.expert_bias_E": torch.randn(4, generator=g),
        "layers.1.moe.counter": torch.tensor([seed, 2, 3]),  # an integer buffer
        "norm.weight": torch.randn(4, generator=g).to(dtype),
    }


def save(path: Path, sd: dict, optim: bool = True) -> Path:
    state = {"model": sd}
    if optim:  # like checkpoints.save_checkpoint: optimizer state beside the model, never merged
        state["optim"] = {"state": {"x": torch.ones(3) * 99}}
    dcp.save(state, checkpoint_id=str(path))
    return path


def load_all(path: Path, like: dict) -> dict:
    out = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load({"model": out}, checkpoint_id=str(path))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_formula(tmp_path, dtype):
    r, i = model_sd(1, dtype), model_sd(2, dtype)
    save(tmp_path / "r", r)
    save(tmp_path / "i", i)
    man = merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "out", 0.8)
    got = load_all(tmp_path / "out", r)
    for k in r:
        if r[k].is_floating_point():
            want = (0.8 * r[k].float() + 0.2 * i[k].float()).to(r[k].dtype)
            assert got[k].dtype == r[k].dtype
            assert torch.equal(got[k], want), k
            assert not torch.equal(got[k], r[k])
        else:
            assert torch.equal(got[k], r[k])  # integer buffers come from the reasoning side
    assert man["alpha"] == 0.8
    assert man["copied_from_reasoning"] == ["layers.1.moe.counter"]
    assert man["copied_keys_that_differed"] == ["layers.1.moe.counter"]
    assert len(man["reasoning"]["sha256"]) == 64 and man["reasoning"]["sha256"] != man["instruct"]["sha256"]
    md = dcp.FileSystemReader(str(tmp_path / "out")).read_metadata()
    assert not [k for k in md.state_dict_metadata if not k.startswith("model.")]  # no optimizer state
    assert json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["alpha"] == 0.8
    assert not (tmp_path / "out.tmp").exists()


def test_merge_alpha_endpoints(tmp_path):
    r, i = model_sd(3), model_sd(4)
    save(tmp_path / "r", r)
    save(tmp_path / "i", i)
    merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "a1", 1.0, hash_inputs=False)
    merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "a0", 0.0, hash_inputs=False)
    a1, a0 = load_all(tmp_path / "a1", r), load_all(tmp_path / "a0", r)
    assert all(torch.equal(a1[k], r[k]) for k in r)
    assert torch.equal(a0["norm.weight"], i["norm.weight"])
    with pytest.raises(merge.MergeError, match="alpha=1.5"):
        merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "bad", 1.5)


def test_merge_large_tensor_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "ROW_CHUNK_ELEMS", 8)  # forces several row chunks
    g = torch.Generator().manual_seed(0)
    r = {"w": torch.randn(7, 5, 3, generator=g).bfloat16()}
    i = {"w": torch.randn(7, 5, 3, generator=g).bfloat16()}
    save(tmp_path / "r", r)
    save(tmp_path / "i", i)
    merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "o", 0.8, hash_inputs=False)
    want = (0.8 * r["w"].float() + 0.2 * i["w"].float()).bfloat16()
    assert torch.equal(load_all(tmp_path / "o", r)["w"], want)


@pytest.mark.parametrize("change, needle", [
    (lambda sd: sd.pop("norm.weight"), "key norm.weight is in the reasoning checkpoint but not the instruct"),
    (lambda sd: sd.update(extra=torch.ones(2)), "key extra is in the instruct checkpoint but not the reasoning"),
    (lambda sd: sd.update({"norm.weight": torch.ones(5)}), r"key norm.weight: shape \(4,\) \(reasoning\) != \(5,\)"),
    (lambda sd: sd.update({"norm.weight": torch.ones(4, dtype=torch.float64)}), "key norm.weight: dtype"),
])
def test_merge_refuses_mismatch(tmp_path, change, needle):
    r, i = model_sd(1), model_sd(2)
    change(i)
    save(tmp_path / "r", r)
    save(tmp_path / "i", i)
    with pytest.raises(merge.MergeError, match=needle) as e:
        merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "out", 0.8)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_failed_merge_leaves_no_checkpoint(tmp_path, monkeypatch):
    r, i = model_sd(1), model_sd(2)
    save(tmp_path / "r", r)
    save(tmp_path / "i", i)
    calls = {"n": 0}
    real = merge.merge_tensor

    def boom(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*a)

    monkeypatch.setattr(merge, "merge_tensor", boom)
    with pytest.raises(BaseException) as e:  # DCP wraps it in a CheckpointException (a BaseException)
        merge.merge_checkpoints(tmp_path / "r", tmp_path / "i", tmp_path / "out", 0.8)
    assert "disk full" in e.exconly()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(merge.MergeError, match="not a DCP checkpoint"):
        merge.model_entries(tmp_path / "empty")


def test_merge_stage_layout(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("stage_merge", Path(CONF).parent / "stages" / "merge_sft.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    for name, seed in (("sft_reasoning", 1), ("sft_instruct", 2)):
        run = tmp_path / "tiny" / name
        save(run / "checkpoints" / "step-00000010", model_sd(seed))
        (run / "checkpoints" / "latest").write_text("step-00000010")
        (run / "DONE.json").write_text("{}")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("merge_sft", overrides=[f"paths.runs={tmp_path}"])
    assert cfg.alpha == 0.8
    summary = stage.run(cfg)
    out = tmp_path / "tiny" / "merge"
    assert (out / "DONE.json").exists() and (out / "checkpoints" / "latest").read_text() == "step-00000000"
    got = load_all(out / "checkpoints" / "step-00000000", model_sd(1))
    assert torch.allclose(got["norm.weight"], 0.8 * model_sd(1)["norm.weight"] + 0.2 * model_sd(2)["norm.weight"])
    assert summary["finished"]
    # A re-run with the same inputs and alpha keeps the finished merge; another alpha is refused
    # in one line and replaces nothing, unless told to overwrite.
    made = (out / "merge_manifest.json").read_text()
    assert stage.run(cfg) == json.loads((out / "DONE.json").read_text())
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        other = compose("merge_sft", overrides=[f"paths.runs={tmp_path}", "alpha=0.5"])
        replace = compose("merge_sft", overrides=[f"paths.runs={tmp_path}", "alpha=0.5", "overwrite=true"])
    with pytest.raises(FileExistsError, match="finished merge of other inputs or alpha") as refused:
        stage.run(other)
    assert "\n" not in str(refused.value) and (out / "merge_manifest.json").read_text() == made
    assert stage.run(replace)["alpha"] == 0.5
    (tmp_path / "tiny" / "sft_instruct" / "DONE.json").unlink()
    with pytest.raises(FileNotFoundError, match="stage.instruct_from=sft_instruct"):
        stage.run(cfg)
