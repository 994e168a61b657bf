"""Run stages on this machine (torchrun) or on Slurm (submitit), chain them, show their state.

    python launcher.py run pretrain stage=pretrain_s1 launcher=slurm      # one stage
    python launcher.py chain pretrain launcher=slurm model=tiny           # a named chain (CHAINS)
    python launcher.py chain pretrain:pretrain_s1 pretrain:pretrain_s2 launcher=slurm --wait
    python launcher.py status [--runs runs]                               # every stage under runs/
    python launcher.py check pretrain hardware=h200_1536 parallelism=axk1_pretrain model=axk1_519b

A spec is SCRIPT[:STAGE][,OVERRIDE...], several joined by `+` run side by side: SCRIPT names
stages/SCRIPT.py and its config conf/SCRIPT.yaml, STAGE adds `stage=STAGE`, and the overrides
apply to that stage only. Each spec waits for every job of the spec before it (Slurm afterok;
kill-on-invalid-dep cancels the dependants of a failed stage). Arguments with `=` are Hydra
overrides for every stage. The config is composed and checked (config_checks.errors) before anything
is submitted; a bad combination stops here with one line.

On Slurm each task of a job is one rank: SlurmTask exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*
from the Slurm environment and calls the stage's run(cfg) in-process. A job that times out or is
preempted is requeued by submitit (Checkpointable), and one requeued by Slurm restarts the same
pickled task; either way run() resumes from <run_dir>/checkpoints/latest. Hydra multirun
(`stages/pretrain.py -m ...`) goes through hydra-submitit-launcher, wired up by
conf/launcher/*.yaml; HydraCallback below does the check and the rank export there.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import submitit
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kit import preflight
from kit.run_status import slurm_state, status, wait_jobs  # noqa: F401  (also the launcher's API)

ROOT = Path(__file__).resolve().parent
CHAINS = {  # SPEC 3 (pre-training stages) and SPEC 4 (Think-Fusion post-training)
    "pretrain": ["pretrain:pretrain_s1", "pretrain:pretrain_s2", "pretrain:pretrain_s3_16k",
                 "pretrain:pretrain_s3_32k"],
    "post": ["sft:sft_instruct+sft:sft_reasoning", "merge_sft", "sft:mod_sft", "rl_train", "evaluate"],
}


class LaunchError(RuntimeError):
    """A problem the user fixes in the config or the command line; printed as one line."""


# ---------------------------------------------------------------------------------------
# Config: compose exactly what the stage's own @hydra.main would, then check it.
# ---------------------------------------------------------------------------------------
def _compose(script: str, overrides: list[str], conf_dir: Path) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from kit import config_checks  # noqa: F401  registers the kit's OmegaConf resolvers (e.g. same_tokens)

    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3", job_name=script):
        cfg = hydra_compose(config_name=script, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(job)
    return job


def compose(script: str, overrides: list[str], conf_dir: Path) -> tuple[DictConfig, list[str]]:
    """The stage's config, interpolations resolved (what the job will see), and the overrides
    that produce it: `launcher=X` becomes `+launcher=X` for a config without a launcher group.
    A command line Hydra refuses is one LaunchError line naming the closest known keys."""
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not (conf_dir / f"{script}.yaml").exists():
        raise LaunchError(f"no config {conf_dir / script}.yaml for stage script {script}")
    try:
        try:
            return _compose(script, overrides, conf_dir), overrides
        except ConfigCompositionException as e:
            if "override 'launcher'" not in str(e):
                raise
        overrides = ["+" + o if o.startswith("launcher=") else o for o in overrides]
        return _compose(script, overrides, conf_dir), overrides
    except (HydraException, OmegaConfBaseException) as e:
        line = preflight.composition_error(script, overrides, e, lambda ov: _compose(script, ov, conf_dir))
        raise LaunchError(line) from None


# Stages without a hardware group (merge, evaluate) run as one CPU task.
ONE_TASK = {"name": "one_task", "device": "cpu", "nodes": 1, "procs_per_node": 1, "gpus_per_node": 0,
            "cpus_per_task": 1, "mem_gb": 8}


def hardware_of(cfg: DictConfig) -> DictConfig:
    return cfg.hardware if "hardware" in cfg else OmegaConf.create(ONE_TASK)


def config_errors(cfg: DictConfig) -> list[str]:
    """Hardware x parallelism x model x batch problems; launcher-specific ones first."""
    out = []
    hw = hardware_of(cfg)
    if hw.device == "cuda" and hw.procs_per_node != hw.gpus_per_node:
        out.append(f"hardware/{hw.name}.yaml: procs_per_node={hw.procs_per_node} must equal "
                   f"gpus_per_node={hw.gpus_per_node} (one rank per GPU)")
    if cfg.get("max_model_len") and "model" in cfg and cfg.max_model_len > cfg.model.max_seq_len:  # serve
        out.append(f"conf/serve.yaml max_model_len={cfg.max_model_len}: exceeds model/{cfg.model.name}.yaml "
                   f"max_seq_len={cfg.model.max_seq_len} (vLLM refuses it; null takes max_seq_len)")
    if "stage" in cfg and "budget" in cfg.stage:  # the training stages; config_checks.py is the lead's checker
        from kit import config_checks
        out += config_checks.errors(cfg) + config_checks.loop_errors(cfg)
    return out


def problems(script: str, cfg: DictConfig, overrides: list[str], made_earlier: set[Path] | None = None) -> list[str]:
    """Every problem of one stage, one line each: the config checks (a value the command line
    gave is blamed on the command line) and, with `made_earlier` (the run folders of the stages
    before it in its chain), its inputs."""
    errs = [preflight.blame_command_line(e, overrides) for e in config_errors(cfg)]
    if made_earlier is not None:
        errs += preflight.input_errors(script, cfg, made_earlier, CHAINS)
    return errs


def check(cfg: DictConfig, overrides: list[str] = ()) -> None:
    errs = problems("", cfg, list(overrides))
    if errs:
        more = f" (+{len(errs) - 1} more; `launcher.py check` lists all)" if len(errs) > 1 else ""
        raise LaunchError(f"refused before submission: {errs[0]}{more}")


# ---------------------------------------------------------------------------------------
# What runs inside each Slurm task.
# ---------------------------------------------------------------------------------------
def load_stage(script_path: str):
    spec = importlib.util.spec_from_file_location(f"axk1_stage_{Path(script_path).stem}", script_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export_dist_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the submitit (Slurm or local) job.
    CUDA_VISIBLE_DEVICES stays whole: the stages pick cuda:LOCAL_RANK as under torchrun."""
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class SlurmTask(submitit.helpers.Checkpointable):
    """One rank of a stage. Checkpointable: on timeout/preemption submitit requeues this same
    object, and run() resumes from the stage's latest checkpoint (nothing lost or repeated)."""

    def __init__(self, script_path: str, cfg_yaml: str):
        self.script_path, self.cfg_yaml = script_path, cfg_yaml

    def __call__(self) -> dict:
        export_dist_env()
        env = submitit.JobEnvironment()
        logging.basicConfig(level=logging.INFO, format=f"[rank{env.global_rank}] %(asctime)s %(name)s: %(message)s")
        logging.getLogger("submitit").propagate = False  # it has its own handler
        print(f"[launcher] job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}, "
              f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
        cfg = OmegaConf.create(self.cfg_yaml)
        done = Path(cfg.run_dir) / "DONE.json"
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and done.exists():
            # Requeued after the stage had finished (Slurm kills a job KillWait seconds after its
            # requeue signal, the run may complete meanwhile): its summary stands, nothing reruns.
            return json.loads(done.read_text())
        stage = load_stage(self.script_path)
        try:
            return stage.run(cfg)
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


class HydraCallback(Callback):
    """Installed by conf/launcher/*.yaml: a plain run with launcher=slurm submits; a multirun goes
    through hydra-submitit-launcher, checked first, one task per rank."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Check the base config once, before any job is submitted (the tasks find the kit through
        # its editable install in .venv, see pyproject.toml).
        job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            check(job, list(config.hydra.overrides.task))
        except LaunchError as e:
            sys.exit(f"axk1: {e}")

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # `python stages/X.py launcher=slurm ...` (no -m): submit through this launcher, like
        # `launcher.py run X ...`, instead of training in this process.
        if OmegaConf.select(config, "launcher.name") != "slurm" or os.environ.get("SUBMITIT_EXECUTOR"):
            return
        script = Path(sys.argv[0]).resolve()
        conf = next(s.path for s in config.hydra.runtime.config_sources if s.provider == "main")
        from hydra.core.global_hydra import GlobalHydra
        GlobalHydra.instance().clear()  # compose() below starts its own Hydra
        try:  # Hydra turns a callback's exception into a warning and would go on to train here
            rc = main(["run", script.stem, *config.hydra.overrides.task, "--stages-dir", str(script.parent),
                       "--conf-dir", conf.removeprefix("file://")])
        except Exception as e:
            sys.exit(f"axk1: {e}")
        sys.exit(rc)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR"):  # inside a submitit job: one task per rank
            export_dist_env()


# ---------------------------------------------------------------------------------------
# Submission.
# ---------------------------------------------------------------------------------------
def slurm_executor(cfg: DictConfig, folder: Path, name: str, after: list[str]) -> submitit.AutoExecutor:
    hw, la = hardware_of(cfg), cfg.launcher
    # Cluster-specific settings live in the launcher config; a hardware config may override
    # them for its cluster under `slurm:` (e.g. partition, constraint).
    sl = {**OmegaConf.to_container(la), **OmegaConf.to_container(hw.get("slurm") or OmegaConf.create())}
    extra = {"requeue": True, "kill-on-invalid-dep": "yes", **(sl.get("additional_parameters") or {})}
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=sl["max_requeues"])
    params = dict(
        name=name, nodes=hw.nodes, tasks_per_node=hw.procs_per_node, cpus_per_task=hw.cpus_per_task,
        gpus_per_node=hw.gpus_per_node or None, mem_gb=hw.mem_gb, timeout_min=sl["timeout_min"],
        slurm_partition=sl.get("partition"), slurm_account=sl.get("account"), slurm_qos=sl.get("qos"),
        slurm_constraint=sl.get("constraint"), slurm_exclusive=sl.get("exclusive"),
        slurm_signal_delay_s=sl["signal_delay_s"], slurm_additional_parameters=extra,
        slurm_srun_args=list(sl.get("srun_args") or []),
        slurm_setup=["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
                     *(sl.get("setup") or [])],
    )
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def record(run_dir: Path, **fields) -> None:
    """Append to <run_dir>/jobs.jsonl: what was launched there, for `status`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fields["time"] = datetime.datetime.now().isoformat(timespec="microseconds")  # orders `status`
    with open(run_dir / "jobs.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\n")


def submit_slurm(script_path: Path, cfg: DictConfig, overrides: list[str], after: list[str]) -> str:
    run_dir = Path(cfg.run_dir).resolve()
    name = "-".join(["axk1", *(str(v) for v in (OmegaConf.select(cfg, "model.name"),
                                                  OmegaConf.select(cfg, "stage.name", default=script_path.stem)) if v)])
    ex = slurm_executor(cfg, run_dir / "slurm" / "%j", name, after)
    job = ex.submit(SlurmTask(str(script_path.resolve()), OmegaConf.to_yaml(cfg)))
    # The resolved config and the overrides beside the job's logs (<run_dir>/slurm/<job id>/).
    folder = Path(job.paths.folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    record(run_dir, launcher="slurm", job_id=job.job_id, after=after, folder=str(folder), overrides=overrides)
    return job.job_id


def run_local(script_path: Path, cfg: DictConfig, overrides: list[str]) -> int:
    """torchrun on this machine with hardware.procs_per_node ranks; the stage composes the same
    config itself from the same overrides (and Hydra saves it under <run_dir>/hydra)."""
    run_dir = Path(cfg.run_dir).resolve()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={hardware_of(cfg).procs_per_node}", str(script_path), *overrides]
    record(run_dir, launcher="local", state="RUNNING", overrides=overrides)
    label = OmegaConf.select(cfg, "stage.name", default=script_path.stem)
    print(f"== {label}: torchrun --nproc_per_node={hardware_of(cfg).procs_per_node} "
          f"{script_path.relative_to(ROOT) if script_path.is_relative_to(ROOT) else script_path} {' '.join(overrides)}",
          flush=True)
    rc = subprocess.call(cmd)
    record(run_dir, launcher="local", state="COMPLETED" if rc == 0 else "FAILED", returncode=rc)
    return rc


def parse_spec(spec: str, stages_dir: Path) -> list[tuple[Path, list[str]]]:
    out = []
    for part in spec.split("+"):
        head, *extra = part.split(",")
        script, _, stage = head.partition(":")
        path = stages_dir / f"{script}.py"
        if not path.exists():
            raise LaunchError(f"no stage script {path} (spec {part!r})")
        out.append((path, ([f"stage={stage}"] if stage else []) + extra))
    return out


def chain(specs: list[str], overrides: list[str], stages_dir: Path, conf_dir: Path, wait: bool) -> int:
    """Compose and check every stage first, then launch; returns a process exit code."""
    # A spec's own overrides come last so that they win over the ones for every stage.
    steps = [[(path, overrides + stage_ov) for path, stage_ov in parse_spec(s, stages_dir)] for s in specs]
    composed = [[(path, *compose(path.stem, ov, conf_dir)[::-1]) for path, ov in step]  # (path, ov, cfg)
                for step in steps]
    # Every stage is checked before torchrun or Slurm starts anything. The first stage with
    # problems lists them, one line each; later stages' own problems are counted, not listed
    # (they are mostly the same mistake seen again through another stage's config).
    found, later, made = [], {}, set()
    for step in composed:
        for path, ov, cfg in step:
            seen = {preflight.same_problem(e) for e in found}
            errs = [e for e in problems(path.stem, cfg, ov, made) if preflight.same_problem(e) not in seen]
            if found and errs:
                later[OmegaConf.select(cfg, "stage.name", default=path.stem)] = len(errs)
            elif errs:
                found = errs
        made |= {Path(cfg.run_dir).resolve() for _, _, cfg in step if "run_dir" in cfg}
    if later:
        found.append(f"and {sum(later.values())} more in {', '.join(later)} (`launcher.py check` "
                     f"lists one stage's; fix the above first)")
    if found:
        raise LaunchError("\naxk1: ".join(found))
    mode = OmegaConf.select(composed[0][0][2], "launcher.name", default="local")
    if mode == "local":  # one stage after another; the first failure stops its dependants
        for i, step in enumerate(composed):
            for path, ov, cfg in step:
                if run_local(path, cfg, ov) != 0:
                    left = [OmegaConf.select(c, "stage.name", default=p.stem)
                            for later in composed[i + 1:] for p, _, c in later]
                    print(f"[launcher] {path.stem} failed; not started: {', '.join(left) or 'none'}")
                    return 1
        return 0
    jobs = []
    # Pre-training data still being curated by Slurm jobs (`make data LAUNCHER=slurm`): the
    # first stages wait for the job that writes the manifests (afterok), no manual hand-off.
    after = sorted({j for _, _, cfg in composed[0] if "data" in cfg and OmegaConf.select(cfg, "data.root")
                    and (j := preflight.pending_data_job(cfg.data.root))})
    for step in composed:
        ids = [submit_slurm(path, cfg, ov, after) for path, ov, cfg in step]
        for (path, ov, cfg), jid in zip(step, ids):
            label = OmegaConf.select(cfg, "stage.name", default=path.stem)
            print(f"{label}\t{jid}\t{'afterok:' + ':'.join(after) if after else 'no dependency'}\t"
                  f"{Path(cfg.run_dir).resolve()}", flush=True)
            jobs.append((label, jid))
        after = ids
    return wait_jobs(jobs) if wait else 0


# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launcher.py", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["run", "chain", "status", "check"])
    ap.add_argument("args", nargs="*", help="stage specs (SCRIPT[:STAGE]) and Hydra overrides (key=value)")
    ap.add_argument("--wait", action="store_true", help="Slurm: wait for the jobs and fail if any failed")
    ap.add_argument("--runs", default="runs", help="status: the runs folder (paths.runs)")
    ap.add_argument("--stages-dir", default=str(ROOT / "stages"), type=Path)
    ap.add_argument("--conf-dir", default=str(ROOT / "conf"), type=Path)
    a = ap.parse_intermixed_args(argv)
    # A spec's first comma-separated part has no `=` (toy,stage.steps=3); an override's has.
    specs = [x for x in a.args if "=" not in x.split(",")[0]]
    overrides = [x for x in a.args if x not in specs]
    try:
        if a.command == "status":
            from kit.run_status import print_status
            print_status(Path(a.runs))
            return 0
        if not specs:
            raise LaunchError(f"{a.command}: name a stage script (e.g. pretrain) or a chain ({', '.join(CHAINS)})")
        if a.command == "check":  # every spec (a named chain: each of its stages), config only
            named = CHAINS[specs[0]] if len(specs) == 1 and specs[0] in CHAINS else specs
            for path, ov in [step for spec in named for step in parse_spec(spec, a.stages_dir)]:
                cfg, _ = compose(path.stem, ov + overrides, a.conf_dir)
                errs = problems(path.stem, cfg, ov + overrides)
                for e in errs:
                    print(f"axk1: {e}", file=sys.stderr)
                if errs:
                    return 2
                hw = hardware_of(cfg)
                print(f"ok: {OmegaConf.select(cfg, 'stage.name', default=path.stem)} on {hw.nodes} x {hw.procs_per_node} ranks ({hw.name}), "
                      f"launcher {OmegaConf.select(cfg, 'launcher.name', default='local')}")
                if OmegaConf.select(cfg, "parallelism.pp", default=1) > 1 and "budget" in cfg.stage:
                    from kit import (
                        config_checks,
                        pipeline,  # the stage split the trainer builds, validated
                    )
                    p = cfg.parallelism
                    print(pipeline.split_report(cfg.model, p.pp * p.pp_stages_per_rank, config_checks.budget(cfg).seq_len))
            return 0
        if a.command == "run" and len(specs) != 1:
            raise LaunchError("run takes one spec; use chain for several")
        if a.command == "chain" and len(specs) == 1 and specs[0] in CHAINS:
            specs = CHAINS[specs[0]]
        return chain(specs, overrides, a.stages_dir, a.conf_dir, a.wait)
    except LaunchError as e:
        print(f"axk1: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
