"""The whole curation chain (stages/curate.py's steps) on one corpus: docs/s and tokens/s at 1 vs 2
tasks (at 1x and 4x the corpus), and peak RSS of a task at 1x vs 4x the corpus, side by side in one
run; ends in one JSON line.

  OMP_NUM_THREADS=1 .venv/bin/python bench/curate_throughput.py [--copies 1] [--out /tmp/curate_bench]

The corpus is the tiny one (conf/data/tiny.yaml's sources), written to JSONL files; copy k of it has
its ASCII letters rotated by 7k, so the 4x corpus holds 4x distinct text (Korean and digits repeat,
and near-dedup removes those repeats). Each configuration runs in a child process of its own: with
one worker the tasks run in that process, so its peak RSS is a task's (plus the interpreter and torch).
"""
import argparse
import json
import resource
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES_PER_COPY = 8  # JSONL files per copy: file sources are split across tasks by file


def rotate(k: int):
    lo, up = string.ascii_lowercase, string.ascii_uppercase
    return str.maketrans(lo + up, lo[k:] + lo[:k] + up[k:] + up[:k])


def write_corpus(dc: dict, folder: Path, copies: int) -> dict:
    """The tiny sources as JSONL: templated kit data (dedup: false in tiny.yaml) in its own source."""
    import data as D

    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: [open(folder / f"{kind}.{c:02d}_{i:02d}.jsonl", "w") for c in range(copies)
                    for i in range(FILES_PER_COPY)] for kind in ("bench", "bench_templated")}
    n = 0
    for name, src in dc["sources"].items():
        kind = "bench" if src.get("dedup", True) else "bench_templated"
        for rec in D.iter_records({"name": name, **src}, None):
            for c in range(copies):
                text = rec["text"].translate(rotate(7 * c % 26))
                files[kind][c * FILES_PER_COPY + n % FILES_PER_COPY].write(json.dumps(
                    {"text": text, "lang": rec["lang"], "category": rec["category"]}, ensure_ascii=False) + "\n")
            n += 1
    for f in files["bench"] + files["bench_templated"]:
        f.close()
    return {kind: {"kind": "jsonl", "paths": [str(folder / f"{kind}.*.jsonl")], "lang": "en", "category": "Web",
                   **({"dedup": False} if kind == "bench_templated" else {})} for kind in files}


def run_one(spec: dict) -> dict:
    """Child: the chain over spec's corpus; prints one JSON line with its figures."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stages import curate  # the kit is installed into the venv (make setup): no sys.path edits

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dc = OmegaConf.to_container(compose("curate").data, resolve=True)
    out = Path(spec["out"])
    dc.update(root=str(out / "data"), work_dir=str(out / "work"), sources=spec["sources"],
              executor={"kind": "local", "tasks": spec["tasks"], "workers": spec["tasks"]})
    dc["filters"]["repetition"]["skip_sources"] = ["bench_templated"]
    # Training samples the 1x corpus already fills, so 1x and 4x train on the same sample size: the
    # sample caps (quality.train_docs per language, this per category) bound a task's memory.
    dc["domain"]["train_docs_per_category"] = 200
    curate.prepare_work(out / "work", resume=False)
    t0 = time.perf_counter()
    curate.curation_chain(dc, out / "work").run()
    wall = time.perf_counter() - t0
    stats = [json.loads(p.read_text()) for p in (out / "work" / "tokens").glob("*.stats.json")]
    m = json.loads((out / "data" / "pretrain_s1" / "manifest.json").read_text())
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"wall_s": round(wall, 2), "docs": m["docs_read"], "tokens": sum(s["tokens"] for s in stats),
            "peak_rss_mb": round(rss / 1024, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=1, help="the 1x corpus: copies of the tiny corpus")
    ap.add_argument("--out", default="/tmp/curate_bench")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # child mode: a JSON spec
    a = ap.parse_args()
    if a.run:
        print("BENCH " + json.dumps(run_one(json.loads(a.run))), flush=True)
        return
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dc = OmegaConf.to_container(compose("curate").data, resolve=True)
    out = Path(a.out)
    corpora = {f"{x}x": write_corpus(dc, out / f"corpus_{x}x", a.copies * x) for x in (1, 4)}
    runs = {}
    # 4x at 2 tasks too: the classifier trainings run once on capped samples, a fixed serial part
    # that weighs less as the corpus grows (the 1x ratio is the figure)
    for name, corpus, tasks in [("1x_1task", "1x", 1), ("1x_2tasks", "1x", 2), ("4x_1task", "4x", 1),
                                ("4x_2tasks", "4x", 2)]:
        spec = {"out": str(out / name), "sources": corpora[corpus], "tasks": tasks}
        p = subprocess.run([sys.executable, __file__, "--run", json.dumps(spec)], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH ")]
        if p.returncode or not line:
            raise SystemExit(f"{name}: rc {p.returncode}\n{p.stderr[-3000:]}")
        r = json.loads(line[0][6:])
        r.update(tasks=tasks, docs_per_s=round(r["docs"] / r["wall_s"], 1), tokens_per_s=round(r["tokens"] / r["wall_s"]),
                 docs_per_s_per_task=round(r["docs"] / r["wall_s"] / tasks, 1),
                 tokens_per_s_per_task=round(r["tokens"] / r["wall_s"] / tasks))
        runs[name] = r
        print(f"{name:<10} tasks {tasks}  {r['docs']:>6} docs {r['tokens']:>10} tokens  {r['wall_s']:7.1f} s  "
              f"{r['docs_per_s']:8.1f} docs/s  {r['tokens_per_s']:>9} tok/s  "
              f"({r['tokens_per_s_per_task']} tok/s per task)  peak RSS {r['peak_rss_mb']} MB", flush=True)
    print(json.dumps({"runs": runs,
                      "throughput_ratio_2_vs_1": round(runs["1x_2tasks"]["tokens_per_s"] / runs["1x_1task"]["tokens_per_s"], 3),
                      "throughput_ratio_2_vs_1_at_4x": round(runs["4x_2tasks"]["tokens_per_s"]
                                                             / runs["4x_1task"]["tokens_per_s"], 3),
                      "rss_ratio_4x_vs_1x": round(runs["4x_1task"]["peak_rss_mb"] / runs["1x_1task"]["peak_rss_mb"], 3)}))


if __name__ == "__main__":
    main()
