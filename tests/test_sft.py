"""stages/sft.py packing: next-token targets per chat, prompt masked, positions restart per chat."""

import importlib.util
from pathlib import Path

import torch

from kit import chat_data

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stage_sft", ROOT / "stages" / "sft.py")
sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sft)
IGN = chat_data.IGNORE_INDEX


def test_pack_chats_alignment():
    # chat a: prompt [10, 11], response [12, 13]; chat b: prompt [20], response [21, 22, 23]
    a = ([10, 11, 12, 13], [IGN, IGN, 12, 13])
    b = ([20, 21, 22, 23], [IGN, 21, 22, 23])
    rows = sft.pack_chats([a, b], seq_len=8, pad_id=0, seed=0)
    assert rows["input_ids"].shape == (1, 8)
    got = {tuple(rows["input_ids"][0, :3].tolist()), tuple(rows["input_ids"][0, 3:6].tolist())}
    assert got == {(10, 11, 12), (20, 21, 22)}
    pairs = dict(zip(rows["input_ids"][0, :6].tolist(), rows["labels"][0, :6].tolist()))
    # input token -> its target: the prompt's last token predicts the first response token
    assert pairs == {10: IGN, 11: 12, 12: 13, 20: 21, 21: 22, 22: 23}
    assert rows["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]  # chat, chat, padding
    assert rows["labels"][0, 6:].tolist() == [IGN, IGN] and rows["input_ids"][0, 6:].tolist() == [0, 0]


def test_pack_chats_starts_new_row_when_full():
    chats = [([1, 2, 3, 4, 5], [IGN, IGN, 3, 4, 5])] * 3  # 4 inputs each, rows of 6 hold one
    rows = sft.pack_chats(chats, seq_len=6, pad_id=0, seed=1)
    assert rows["input_ids"].shape == (3, 6)
    assert (rows["labels"] != IGN).sum().item() == 3 * 3
    assert torch.equal(rows["positions"][:, :4], torch.arange(4).repeat(3, 1))
