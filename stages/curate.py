"""Hydra stage: curate, mix, tokenize and pack the pre-training data of the three stages (paper 3.1).

  python stages/curate.py                 # tiny: artifacts/data/tiny/pretrain_s{1,2,3}/
  python stages/curate.py data.executor.tasks=2 data.executor.workers=2   # 2 parallel tasks
  python stages/curate.py data=axk1       # Slurm job arrays (see conf/data/axk1.yaml)
  python stages/curate.py data=tiny --cfg job --resolve   # prints the fully composed config, runs nothing

One streaming datatrove chain (kit/curation_steps.py, kit/curation_mix.py), every step `tasks`
parallel tasks unless it is a global one (MinHash cluster, model training, packing):
  filter     read sources (bad records counted per reason) -> heuristic filters -> exact dedup
  minhash1-4 signatures -> buckets -> clusters -> near-duplicate filter
  sample_q   bottom-k sample per language -> train_q: quality model, saved in work_dir/models
  quality    model quality filter (batched) + bottom-k sample per category -> train_d: domain model
  tokenize   domain relabel (batched) -> difficulty bucket -> token partition + per-category stats
  mix        per stage: Appendix B.1 mixture from the stats, easy-to-hard order, shards + manifest.json
Locally the chain runs here; on Slurm every step is a job array chained with afterok and this
command returns once submitted. datatrove marks finished tasks (logs/<step>/completions), so a
re-run with data.resume=true skips them and runs only what is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import data as D
from kit import console, curation, preflight
from kit import curation_steps as S
from kit.curation_mix import MixStages


def _executor(ex_cfg: dict, pipeline: list, tasks: int, name: str, work: Path, depends=None):
    """datatrove executor: LocalPipelineExecutor here, SlurmPipelineExecutor on a cluster (same steps)."""
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

    logs = str(work / "logs" / name)
    if ex_cfg.get("kind", "local") == "local":
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(tasks, int(ex_cfg.get("workers", 1))),
                                     logging_dir=logs, depends=depends, start_method="fork")
    return SlurmPipelineExecutor(pipeline, tasks=tasks, job_name=f"axk1-{name}", logging_dir=logs, depends=depends,
                                 time=ex_cfg["time"], partition=ex_cfg["partition"],
                                 cpus_per_task=int(ex_cfg.get("cpus_per_task", 1)),
                                 mem_per_cpu_gb=int(ex_cfg.get("mem_per_cpu_gb", 2)),
                                 venv_path=ex_cfg.get("venv_path"), sbatch_args=ex_cfg.get("sbatch_args"))


def prepare_work(work: Path, resume: bool) -> None:
    """A fresh run starts clean (datatrove would skip tasks it finds completed); a resumed one keeps
    every finished task's output and completion marker."""
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)


def dedup_chain(dc: dict, ex: dict, tasks: int, work: Path):
    """filter -> MinHash 1-4, as executors chained by `depends`; returns the last one."""
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    mh = dc["minhash"]
    mcfg = MinhashConfig(n_grams=int(mh["n_grams"]), num_buckets=int(mh["num_buckets"]),
                         hashes_per_bucket=int(mh["hashes_per_bucket"]), seed=int(mh.get("seed", 1)),
                         hash_config=HashConfig(hash_fc=mh.get("hash_fc", "sha1"), precision=64))
    filtered = work / "filtered"
    # Kit-made sources (dedup: false) are templated on purpose: MinHash would fold them together,
    # so their documents go to filtered/bypass and skip near-dedup (they still pass the filters).
    filt = _executor(ex, [S.SourceReader(dc["sources"], str(work / "audit" / "read")),
                          *curation.build_filters(dc["filters"]),
                          JsonlWriter(str(filtered), output_filename="${route}/${rank}.jsonl", compression=None),
                          S.TouchOutputs([f"{filtered}/dedup/${{rank}}.jsonl", f"{filtered}/bypass/${{rank}}.jsonl"])],
                     tasks, "filter", work)
    sig = _executor(ex, [JsonlReader(str(filtered / "dedup")),
                         MinhashDedupSignature(str(work / "sigs"), mcfg, language=curation.WORDS)],
                    tasks, "minhash1", work, depends=filt)
    buck = _executor(ex, [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mcfg)],
                     mcfg.num_buckets * int(mh.get("tasks_per_bucket", 1)), "minhash2", work, depends=sig)
    clus = _executor(ex, [MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=mcfg)],
                     1, "minhash3", work, depends=buck)
    return _executor(ex, [JsonlReader(str(filtered / "dedup")),
                          MinhashDedupFilter(str(work / "remove_ids"),
                                             exclusion_writer=JsonlWriter(str(work / "near_dups"), compression=None)),
                          JsonlWriter(str(work / "deduped"), output_filename="${rank}.jsonl", compression=None),
                          S.TouchOutputs([f"{work}/deduped/${{rank}}.jsonl"])],
                     tasks, "minhash4", work, depends=clus)


def curation_chain(dc: dict, work: Path):
    """The whole chain; returns its last executor (running it runs or submits what is missing)."""
    import torch

    # One thread per task: the parallelism is across tasks. It also keeps forked workers safe: a
    # child forked after torch ran on its OpenMP pool here (the 1-task training steps run in this
    # process) hangs in that pool; with one thread the pool is never started.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # likewise for HF tokenizers' thread pool
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    ex = dc["executor"]
    tasks = int(ex.get("tasks", 1))
    last = dedup_chain(dc, ex, tasks, work)
    q, dm = dc["quality"], dc["domain"]
    models = work / "models"

    def deduped():  # readers of this task's near-deduplicated and bypass files
        return [JsonlReader(str(work / "deduped")), JsonlReader(str(work / "filtered" / "bypass"))]

    if q.get("enabled", True):
        last = _executor(ex, [*deduped(), S.BottomKSample(str(work / "samples" / "quality"), "lang", int(q["train_docs"]))],
                         tasks, "sample_quality", work, depends=last)
        last = _executor(ex, [S.TrainClassifier("quality", q, str(work / "samples" / "quality"),
                                                str(models / "quality.pt"), int(dc["seed"]))],
                         1, "train_quality", work, depends=last)
    last = _executor(ex, [*deduped(), *([S.ApplyQuality(q, str(models / "quality.pt"))] if q.get("enabled", True) else []),
                          S.BottomKSample(str(work / "samples" / "domain"), "category", int(dm["train_docs_per_category"])),
                          JsonlWriter(str(work / "quality"), output_filename="${rank}.jsonl", compression=None),
                          S.TouchOutputs([f"{work}/quality/${{rank}}.jsonl"])],
                     tasks, "quality", work, depends=last)
    if dm.get("enabled", True):
        last = _executor(ex, [S.TrainClassifier("domain", dm, str(work / "samples" / "domain"),
                                                str(models / "domain.pt"), int(dc["seed"]))],
                         1, "train_domain", work, depends=last)
    categories = sorted({c for st in D.STAGES for c in dc["mixture"][st]} | {s["category"] for s in dc["sources"].values()})
    last = _executor(ex, [JsonlReader(str(work / "quality")),
                          *([S.ApplyDomain(dm, str(models / "domain.pt"))] if dm.get("enabled", True) else []),
                          S.TokenizePartition(dc["tokenizer_dir"], str(work / "tokens"), categories,
                                              int(dc.get("curriculum_buckets", 4)), dc["stage_select"],
                                              int(dc.get("tokenize_batch_docs", 256)))],
                     tasks, "tokenize", work, depends=last)
    return _executor(ex, [MixStages(dc)], 1, "mix", work, depends=last)


def report(root: Path) -> None:
    for stage in D.STAGES:
        m = json.loads((root / stage / "manifest.json").read_text())
        mix = ", ".join(f"{c} {r['realised_pct']:.1f}% ({r['weight_pct']:.1f}%, x{r['upsample']})"
                        for c, r in m["mixture"].items())
        print(f"[curate] {stage}: {m['total_tokens']:,} tokens, {m['total_docs']} docs, {len(m['shards'])} shards "
              f"-> {root / stage}; realised (target, upsample): {mix}", flush=True)
    print(f"[curate] read {m['docs_read']} docs, kept {m['docs_kept']}; drops {m['drops']}; "
          f"domain classifier {m.get('domain_classifier')}", flush=True)


@hydra.main(config_path="../conf", config_name="curate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t0 = time.time()
    dc = OmegaConf.to_container(cfg.data, resolve=True)
    work, root = Path(dc["work_dir"]), Path(dc["root"])
    if jid := preflight.pending_data_job(root):  # a fresh run would delete the queued jobs' work folder
        raise SystemExit(f"[curate] Slurm job {jid} of an earlier submission still writes {root}: wait for it, "
                         f"or `scancel` it and re-run")
    prepare_work(work, bool(dc.get("resume", False)))
    (root / "slurm_job.json").unlink(missing_ok=True)
    last = curation_chain(dc, work)
    # datatrove prints every task's banner, pipeline drawing and stats table (its logs folder keeps
    # them per task too): one file for all of it, one line here; a failure shows that file's tail
    datatrove_log = work / "logs" / "console.log"
    print(f"[curate] {len(dc['sources'])} sources, {dc['executor'].get('tasks', 1)} tasks per step "
          f"({dc['executor'].get('kind', 'local')}); datatrove's output: {datatrove_log}", flush=True)
    with console.output_to(datatrove_log):
        last.run()
    if last.get_incomplete_ranks():  # Slurm: the job arrays were submitted, chained with afterok
        # The packing job's id, for the pre-training chain to wait on (launcher.py, afterok)
        root.mkdir(parents=True, exist_ok=True)
        (root / "slurm_job.json").write_text(json.dumps({"job_id": str(last.job_id)}))
        print(f"[curate] datatrove jobs submitted (logs in {work / 'logs'}); job {last.job_id} writes "
              f"{root}/<stage>/manifest.json, and `make pretrain LAUNCHER=slurm` waits for it. After a failure, "
              "re-run with data.resume=true", flush=True)
        return
    report(root)
    print(f"[curate] done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
