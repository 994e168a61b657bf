"""The paper's benchmark tables (Tables 4-5) on a served model (issue 19): config -> server -> score.

    python stages/eval_bench.py ckpt=mod_sft limit=2       # export, vLLM on 127.0.0.1, both modes
    python stages/eval_bench.py endpoint=http://127.0.0.1:8000 results_dir=/tmp/ref   # any served model
    make eval-bench CKPT=mod_sft LIMIT=2                   # the same through make (needs make serve-setup)
    python stages/eval_bench.py --cfg job --resolve        # prints the fully composed config, runs nothing

Every (benchmark, mode) pair of conf/bench/paper_tables.yaml gets a row: a score with its bootstrap
95% interval (avg@k over k distinct seeds, items resampled), a `no data` row naming the file it
expected under bench.data_root, or an `external` row naming the harness it needs. Requests go through
kit.openai_client (the server's chat template, enable_thinking per mode, think tags kept); answers
are read and scored by kit.bench_tasks, code runs in kit.code_sandbox. Writes results.md,
results.json, results.png and samples/<benchmark>_<mode>.jsonl (raw outputs) to the results folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kit import bench_tasks, hf_io, instruction_checks
from kit.code_sandbox import Sandbox
from kit.openai_client import Endpoint, EndpointError
from stages import serve
from stages.evaluate import bootstrap_ci

PAPER_COLUMNS = {"axk1": "A.X K1 (paper)", "deepseek_v31": "DeepSeek-V3.1", "glm46": "GLM-4.6"}


def planned_rows(cfg: DictConfig) -> list[tuple[str, DictConfig, str]]:
    """(key, spec, mode) for every mode each benchmark has a paper figure in, table order."""
    keys = list(cfg.bench.benchmarks) if cfg.only is None else list(cfg.only)
    unknown = [k for k in keys if k not in cfg.bench.benchmarks]
    if unknown:
        raise KeyError(f"conf/eval_bench.yaml only={unknown}: not in conf/bench ({list(cfg.bench.benchmarks)})")
    return [(k, cfg.bench.benchmarks[k], m) for m in cfg.modes for k in keys if m in cfg.bench.benchmarks[k].paper]


def sampling(cfg: DictConfig, mode: str, server_max_len: int | None) -> DictConfig:
    """The mode's preset (a stand-in, conf/bench) with max_tokens capped by `max_tokens` and by half
    the server's context (the other half is left to the prompt)."""
    preset = OmegaConf.to_container(cfg.bench.presets[mode])
    caps = [preset["max_tokens"], cfg.max_tokens, server_max_len // 2 if server_max_len else None]
    preset["max_tokens"] = min(c for c in caps if c)
    return OmegaConf.create(preset)


def blank_row(key: str, spec: DictConfig, mode: str, status: str, note: str) -> dict:
    return {"benchmark": spec.name, "key": key, "mode": mode, "metric": spec.metric, "score": None, "ci": None,
            "paper": dict(spec.paper[mode]), "n": 0, "k": 0, "status": status, "note": note, "settings": ""}


def load_row_items(cfg: DictConfig, key: str, spec: DictConfig, mode: str) -> tuple[list[dict] | None, dict | None]:
    """The row's items (limited), or the finished row when there is nothing to generate."""
    if spec.kind == "external":
        return None, blank_row(key, spec, mode, "external", f"needs {spec.harness}")
    try:
        items = bench_tasks.load_items(spec, Path(cfg.bench.data_root), cfg.bench.seed, cfg.bench.letters, key)
    except bench_tasks.NoData as missing:
        return None, blank_row(key, spec, mode, "no data", f"expected {missing}")
    return items[:cfg.limit] if cfg.limit else items, None


def score_row(cfg: DictConfig, key: str, spec: DictConfig, mode: str, items: list[dict],
              outputs: list[list[dict]], seeds: list[int], preset: DictConfig, sandbox: Sandbox) -> tuple[dict, list]:
    """outputs[j][i]: sample j (seed seeds[j]) for item i. Item score = mean over the k samples;
    the row = mean over items x 100 with the bootstrap interval; malformed = share of all samples."""
    per_item, samples, malformed, left_out = [], [], 0, {}
    for i, item in enumerate(items):
        if spec.kind == "instructions":
            missing = [x for x in item["instructions"] if x not in instruction_checks.CHECKS]
            if missing:
                for name in missing:
                    left_out[name] = left_out.get(name, 0) + 1
                continue
        scores = []
        for j, seed in enumerate(seeds):
            out = outputs[j][i]
            got = bench_tasks.score_output(spec, item, out["text"], mode, sandbox)
            scores.append(got.score)
            malformed += got.malformed
            samples.append({"item": i, "seed": seed, "messages": item["messages"], "output": out["text"],
                            "finish_reason": out.get("finish_reason"), "answer": got.answer,
                            "score": got.score, "malformed": got.malformed, "detail": got.detail})
        per_item.append(sum(scores) / len(scores))
    settings = (f"{spec.prompt} prompt; {mode} preset T={preset.temperature} top_p={preset.top_p} "
                f"top_k={preset.top_k} max_tokens={preset.max_tokens} (stand-in: {preset.source})")
    if spec.get("stand_in"):
        settings += f"; {spec.stand_in}"
    row = blank_row(key, spec, mode, "ok", "")
    row.update(n=len(per_item), k=len(seeds), settings=settings,
               malformed=malformed / max(1, len(per_item) * len(seeds)))
    if left_out:
        row["note"] = "left out (no kit check): " + ", ".join(f"{name} x{n}" for name, n in sorted(left_out.items()))
    if per_item:
        mean, lo, hi = bootstrap_ci(per_item, cfg.bench.bootstrap, cfg.bench.seed)
        row.update(score=100 * mean, ci=[100 * lo, 100 * hi])
    else:
        row["status"] = "no items"
    return row, samples


def results_folder(cfg: DictConfig) -> Path:
    """OUT, else <checkpoint>/bench (the HF folder's for hf_dir), or runs/<model>/bench/endpoint."""
    if cfg.results_dir:
        return Path(cfg.results_dir)
    if cfg.endpoint:
        return Path(cfg.paths.runs) / cfg.model.name / "bench" / "endpoint"
    if cfg.hf_dir:
        return Path(cfg.hf_dir) / "bench"
    return hf_io.resolve_checkpoint(cfg.ckpt, cfg.stages, Path(cfg.paths.runs) / cfg.model.name)[0] / "bench"


@contextlib.contextmanager
def served_model(cfg: DictConfig):
    """The Endpoint: cfg.endpoint as is, or the checkpoint's export served by vLLM on
    cfg.host:cfg.port (stages/serve.py's command; log in the results folder), stopped when the block ends."""
    client = dict(api_key_env=cfg.api_key_env, timeout_s=cfg.request_timeout_s, parallel=cfg.parallel)
    if cfg.endpoint:
        yield Endpoint(cfg.endpoint, **client)
        return
    results = results_folder(cfg)
    if not os.environ.get(cfg.api_key_env):  # a key for this run only; it reaches vLLM through its environment
        os.environ[cfg.api_key_env] = secrets.token_urlsafe(24)
    argv, env = serve.vllm_command(cfg, serve.export_folder(cfg))
    results.mkdir(parents=True, exist_ok=True)
    log = (results / "vllm.log").open("w")
    proc = subprocess.Popen(argv, cwd=argv[argv.index("--model") + 1], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url, start = f"http://{cfg.host}:{cfg.port}", time.time()
    print(f"[eval_bench] vLLM starting on {url} (log {results / 'vllm.log'})", flush=True)
    try:
        while True:
            try:
                endpoint = Endpoint(url, **client)
                break
            except EndpointError:
                if proc.poll() is not None or time.time() - start > cfg.server_start_timeout_s:
                    raise EndpointError(f"vLLM did not come up (exit {proc.poll()}); see {results / 'vllm.log'}")
                time.sleep(3)
        print(f"[eval_bench] vLLM up in {time.time() - start:.0f} s", flush=True)
        yield endpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def server_max_len(endpoint: Endpoint) -> int | None:
    models = endpoint._request("/v1/models").get("data") or [{}]
    return models[0].get("max_model_len")


def run(cfg: DictConfig) -> dict:
    sandbox = Sandbox(cfg.sandbox.time_s, cfg.sandbox.memory_mb, cfg.sandbox.output_mb)
    rows, todo = [], []
    for key, spec, mode in planned_rows(cfg):
        items, done = load_row_items(cfg, key, spec, mode)
        rows.append(done)
        if done is None:
            todo.append((len(rows) - 1, key, spec, mode, items))
    results = results_folder(cfg)
    (results / "samples").mkdir(parents=True, exist_ok=True)
    with served_model(cfg) if todo else contextlib.nullcontext() as endpoint:
        max_len = server_max_len(endpoint) if endpoint else None
        for slot, key, spec, mode, items in todo:
            preset = sampling(cfg, mode, max_len)
            seeds = [cfg.bench.seed + j for j in range(int(cfg.k or spec.k))]
            print(f"[eval_bench] {spec.name} ({mode}): {len(items)} items x k={len(seeds)}", flush=True)
            outputs = [endpoint.chat([it["messages"] for it in items], mode=mode, sampling=preset, seeds=[s] * len(items))
                       for s in seeds]
            rows[slot], samples = score_row(cfg, key, spec, mode, items, outputs, seeds, preset, sandbox)
            with (results / "samples" / f"{key}_{mode}.jsonl").open("w") as f:
                f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        served = f" (served as {endpoint.model})" if endpoint else ""
        model = f"{cfg.endpoint or cfg.hf_dir or cfg.ckpt or 'the last finished smoke stage'}{served}"
    write_results(rows, results, model)
    return {"rows": rows, "results_dir": str(results)}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def write_results(rows: list[dict], results: Path, model: str) -> None:
    """results.json (one record per row), results.md (the table) and results.png (the bar chart)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps({"model": model, "rows": rows}, indent=1, ensure_ascii=False))
    lines = [f"# Benchmarks (paper Tables 4-5): {model}", "",
             "| benchmark | mode | metric | this model [95% CI] | " + " | ".join(PAPER_COLUMNS.values())
             + " | n | k | settings |", "|" + "---|" * 10]
    for r in rows:
        ours = (f"{r['score']:.1f} [{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]" if r["score"] is not None
                else f"{r['status']}: {r['note']}")
        if r["score"] is not None and r.get("malformed"):
            ours += f" (malformed {100 * r['malformed']:.0f}%)"
        settings = "; ".join(x for x in (r["settings"], r["note"] if r["score"] is not None else "") if x)
        lines.append(f"| {r['benchmark']} | {r['mode']} | {r['metric']} | {ours} | "
                     + " | ".join(_fmt(r["paper"].get(c)) for c in PAPER_COLUMNS) + f" | {r['n']} | {r['k']} | {settings} |")
    (results / "results.md").write_text("\n".join(lines) + "\n")
    bar_chart(rows, results / "results.png")
    print(f"[eval_bench] wrote {results / 'results.md'}, results.json, results.png", flush=True)


def bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("thinking", "non_thinking") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(16, 4.5 * len(modes)), squeeze=False)
    series = [("this model", None)] + [(label, c) for c, label in PAPER_COLUMNS.items()]
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        width = 0.8 / len(series)
        for s, (label, col) in enumerate(series):
            values = [(r["score"] if col is None else r["paper"].get(col)) for r in mine]
            xs = [i + s * width for i in range(len(mine))]
            ax.bar(xs, [0 if v is None else v for v in values], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mine))])
        ax.set_xticklabels([r["benchmark"] + ("" if r["score"] is not None else f"\n({r['status']})") for r in mine],
                           rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_title(f"{mode} mode (paper Table {4 if mode == 'thinking' else 5})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hydra.main(config_path="../conf", config_name="eval_bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        out = run(cfg)
    except (EndpointError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"[eval_bench] {e}")
    scored = sum(r["score"] is not None for r in out["rows"])
    print(f"[eval_bench] {len(out['rows'])} rows ({scored} scored) in {out['results_dir']}")


if __name__ == "__main__":
    main()
