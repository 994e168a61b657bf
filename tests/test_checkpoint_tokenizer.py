"""The tokenizer travels with the weights (issue 20): a model trained with tokenizer A, exported and
imported while the kit's configured tokenizer is B (the same strings under other ids), is
post-trained, evaluated and exported with A; data or checkpoints of another tokenizer stop the
stage in one line. A is a permuted-vocabulary copy of the tiny tokenizer (B), made here."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, compose_cfg, stage_module
from tokenizers import Tokenizer

import model as axk1
import tokenizer as tokmod
from kit import checkpoint_tokenizer, checkpoints, hf_io, kv_decoding

pytestmark = pytest.mark.slow  # end to end: a short training run, an export, five 1-step SFT/eval runs

KIT_TOK = ROOT / "artifacts" / "tokenizer" / "tiny"  # B: conf's tokenizer_dir, and the pre-training data's
TRAIN_STEPS = 12  # moves the loss well below a random model's (measured: 5.50 vs 8.36 at the first SFT step)


def permuted_copy(src, dest):
    """Tokenizer A: every id (specials included) reversed, strings and merges unchanged."""
    spec = json.loads((src / "tokenizer.json").read_text())
    size = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    spec["model"]["vocab"] = {piece: size - 1 - i for piece, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = size - 1 - added["id"]
    tokmod.save_tokenizer(Tokenizer.from_str(json.dumps(spec)), dest)
    return dest


def sft_cfg(tmp, name, init, tok_dir, steps):
    return compose_cfg("sft", [f"paths.runs={tmp / 'runs'}", f"run_dir={tmp / name}", f"stage.init_from={init}",
                               f"tokenizer_dir={tok_dir}", f"max_steps={steps}", f"checkpoint.every_steps={steps}",
                               "posttrain_data.sizes.sft_instruct=48", "stage.budget.tiny.seq_len=128",
                               "stage.budget.tiny.batch_end=4", "stage.budget.tiny.batch_start=4", "stage.budget.tiny.epochs=20",
                               "log_every=100"])


def first_loss(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_data):
    """A trained with tokenizer A -> exported (bf16, the release dtype) -> imported with B configured."""
    from _pytest.monkeypatch import MonkeyPatch

    tmp = tmp_path_factory.mktemp("tok")
    sft, export = stage_module("sft"), stage_module("export")
    tok_a = permuted_copy(KIT_TOK, tmp / "tok_a")
    torch.manual_seed(0)
    m = axk1.load_model_cfg("tiny")
    dcp.save({"model": kv_decoding.build_inference_model(m).state_dict()}, checkpoint_id=str(tmp / "random"))
    with MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        sft.run(sft_cfg(tmp, "train_a", tmp / "random", tok_a, TRAIN_STEPS))
        trained = checkpoints.latest_checkpoint(tmp / "train_a")
        assert trained.name == f"step-{TRAIN_STEPS:08d}"
        exported = export.run(compose_cfg("export", [f"ckpt={trained}", f"out={tmp / 'hf'}"]))
    hf_io.import_hf(tmp / "hf", tmp / "imported", m)
    return tmp, tok_a, trained, exported, sft


def test_permuted_tokenizer_has_same_strings_other_ids(released):
    _, tok_a, *_ = released
    a, b = tokmod.load_tokenizer(tok_a), tokmod.load_tokenizer(KIT_TOK)
    text = "<|user|>What is 12 + 7?<|eos|><|assistant|></think>19<|eos|>"
    ids_a, ids_b = a(text, add_special_tokens=False)["input_ids"], b(text, add_special_tokens=False)["input_ids"]
    assert len(ids_a) == len(ids_b) and ids_a == [len(b) - 1 - i for i in ids_b]
    assert checkpoint_tokenizer.tokenizer_hash(tok_a) != checkpoint_tokenizer.tokenizer_hash(KIT_TOK)


def test_export_and_import_carry_tokenizer_a(released):
    tmp, tok_a, _, exported, _ = released
    hash_a = checkpoint_tokenizer.tokenizer_hash(tok_a)
    assert exported["tokenizer_sha256"] == hash_a  # export used A although tokenizer_dir was B
    assert checkpoint_tokenizer.tokenizer_hash(tmp / "hf") == hash_a
    assert "enable_thinking" in json.loads((tmp / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    # what vLLM serves with: the exported folder's template in transformers renders tool calls as the kit does
    from transformers import AutoTokenizer
    from test_tool_calls import tool_chat

    rec = tool_chat()
    served = AutoTokenizer.from_pretrained(str(tmp / "hf")).apply_chat_template(rec["messages"], tools=rec["tools"],
                                                                               tokenize=False)
    assert served == tokmod.load_tokenizer(tok_a).apply_chat_template(rec["messages"], tools=rec["tools"], tokenize=False)
    assert "<tool_call>" in served and "<tool_response>" in served
    assert json.loads((tmp / "imported" / "axk1_import.json").read_text())["tokenizer_sha256"] == hash_a
    assert checkpoint_tokenizer.tokenizer_of(tmp / "imported", KIT_TOK) == tmp / "imported" / "tokenizer"


def test_sft_from_the_import_starts_at_the_exported_models_loss(released, monkeypatch, capsys):
    tmp, tok_a, trained, _, sft = released
    monkeypatch.chdir(ROOT)
    # the exported model's loss on this data: its own fp32 checkpoint, encoded with A
    sft.run(sft_cfg(tmp, "ref", trained, tok_a, 1))
    summary = sft.run(sft_cfg(tmp, "from_import", tmp / "imported", KIT_TOK, 1))  # B configured: A must win
    sft.run(sft_cfg(tmp, "from_random", tmp / "random", KIT_TOK, 1))
    ref, imported, random = (first_loss(tmp / n) for n in ("ref", "from_import", "from_random"))
    # the old behaviour: the import without its tokenizer is encoded with the configured B
    stripped = tmp / "imported_weights_only"
    stripped.mkdir()
    for f in (tmp / "imported").iterdir():
        if f.is_file():
            (stripped / f.name).write_bytes(f.read_bytes())
    sft.run(sft_cfg(tmp, "old_behaviour", stripped, KIT_TOK, 1))
    misnumbered = first_loss(tmp / "old_behaviour")
    print(f"SFT first-step loss: exported model (A) {ref:.4f}, from the import with B configured {imported:.4f}, "
          f"random model {random:.4f}, import encoded with B {misnumbered:.4f}")
    assert abs(imported - ref) / ref < 0.01
    assert random > 1.2 * ref and misnumbered > 1.2 * ref
    hash_a = checkpoint_tokenizer.tokenizer_hash(tok_a)
    assert summary["tokenizer_sha256"] == hash_a  # what DONE.json records when the stage finishes
    assert checkpoint_tokenizer.tokenizer_hash(tmp / "from_import" / "tokenizer") == hash_a  # carried onward


def test_evaluation_encodes_with_the_checkpoints_tokenizer(released, monkeypatch):
    tmp, tok_a, *_ = released
    monkeypatch.chdir(ROOT)
    evaluate = stage_module("evaluate")
    result = evaluate.run(compose_cfg("evaluate", [f"run_dir={tmp / 'eval'}", "~checkpoints",
                                                   f"+checkpoints={{imported: {tmp / 'imported'}}}",
                                                   "posttrain_data.sizes.eval=2", "max_new_tokens=4", "sampled.n=0",
                                                   "modes=[non_thinking]"]))
    assert result["rows"]["imported"]["tokenizer_sha256"] == checkpoint_tokenizer.tokenizer_hash(tok_a)


def test_pretraining_data_of_b_with_a_checkpoint_of_a_stops_in_one_line(released, monkeypatch):
    tmp, tok_a, *_ = released
    monkeypatch.chdir(ROOT)
    pretrain = stage_module("pretrain")
    cfg = compose_cfg("pretrain", ["stage=pretrain_s2", f"stage.init_from={tmp / 'imported'}",
                                   f"run_dir={tmp / 'pretrain_mix'}", "parallelism=none"])
    with pytest.raises(checkpoint_tokenizer.TokenizerMismatch) as err:
        pretrain.run(cfg)
    line = str(err.value)
    assert "\n" not in line and "data " in line and "imported" in line
    assert checkpoint_tokenizer.short(checkpoint_tokenizer.tokenizer_hash(tok_a)) in line
    assert checkpoint_tokenizer.short(checkpoint_tokenizer.tokenizer_hash(KIT_TOK)) in line


def test_merging_checkpoints_of_two_tokenizers_stops_in_one_line(released, monkeypatch):
    tmp, *_ = released
    monkeypatch.chdir(ROOT)
    merge_stage = stage_module("merge_sft")
    cfg = compose_cfg("merge_sft", [f"stage.reasoning_from={tmp / 'imported'}", f"stage.instruct_from={tmp / 'random'}",
                                    f"run_dir={tmp / 'merge'}", "hash_inputs=false"])
    with pytest.raises(checkpoint_tokenizer.TokenizerMismatch, match="stage.reasoning_from .* but stage.instruct_from"):
        merge_stage.run(cfg)
    assert not (tmp / "merge" / "checkpoints" / "step-00000000").exists()
