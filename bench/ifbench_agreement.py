"""How often the kit's IFBench checks (kit/ifbench_checks.py) give IFBench's own verdict.

    .venv/bin/python bench/ifbench_agreement.py --ifbench /path/to/allenai/IFBench

Reads a checkout of allenai/IFBench: the test prompts with their kwargs (`data/IFBench_test.jsonl`)
and the per-instruction verdicts IFBench's own checker wrote for its sample responses
(`eval/eval_results_{strict,loose}.jsonl`, each with the response), rescores each response with
`instruction_checks.follows` and prints instruction- and prompt-level agreement per mode, then each
instruction id where the two differ. Items with an id the kit does not check are left out and counted.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from kit.instruction_checks import Unsupported, follows


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"{path}: missing (expected a checkout of allenai/IFBench)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def agreement(test: list[dict], verdicts: list[dict], strict: bool) -> dict:
    kwargs_by_prompt = {r["prompt"].strip(): r["kwargs"] for r in test}
    agree, total, left_out = Counter(), Counter(), Counter()
    prompts = prompts_agree = 0
    for v in verdicts:
        kwargs = kwargs_by_prompt.get(v["prompt"].strip())
        if kwargs is None:
            continue
        mine = []
        for instruction, kw, theirs in zip(v["instruction_id_list"], kwargs, v["follow_instruction_list"]):
            try:
                ours = bool(v["response"].strip()) and follows(v["response"], instruction, kw, strict=strict)
            except Unsupported:
                left_out[instruction] += 1
                mine = None
                break
            total[instruction] += 1
            agree[instruction] += ours == theirs
            mine.append(ours)
        if mine is not None:
            prompts += 1
            prompts_agree += all(mine) == v["follow_all_instructions"]
    return {"instructions": f"{sum(agree.values())}/{sum(total.values())}", "prompts": f"{prompts_agree}/{prompts}",
            "differ": {i: f"{agree[i]}/{total[i]}" for i in sorted(total) if agree[i] != total[i]},
            "left_out_prompts": dict(left_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ifbench", type=Path, required=True, help="a checkout of github.com/allenai/IFBench")
    args = parser.parse_args()
    test = read_jsonl(args.ifbench / "data" / "IFBench_test.jsonl")
    for mode in ("strict", "loose"):
        verdicts = read_jsonl(args.ifbench / "eval" / f"eval_results_{mode}.jsonl")
        print(json.dumps({"mode": mode, **agreement(test, verdicts, strict=mode == "strict")}))


if __name__ == "__main__":
    main()
