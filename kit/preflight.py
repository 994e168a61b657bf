"""What the launcher checks once, in the launching process, before torchrun or Slurm starts a rank:
the command line composes, every problem is one line that blames where the value came from, and
each stage's inputs exist (or an earlier stage of the same chain makes them).

    composition_error(...)   Hydra's refusal of an override, as one line naming the closest keys
    blame_command_line(...)  "parallelism/x.yaml ep=4: ..." -> "command line parallelism.ep=4: ..."
    input_errors(...)        missing init checkpoints, data manifests, tokenizers: the make target
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The make target that produces each stage's run (launcher.CHAINS, as the Makefile runs them).
MAKE_TARGET_OF_CHAIN = {"pretrain": "make pretrain", "post": "make post"}


# ---------------------------------------------------------------------------------------
# Composition: Hydra's multi-line errors, each reduced to one line.
# ---------------------------------------------------------------------------------------
def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (interior nodes included: `optim`, `optim.lr`)."""
    keys = []
    for k, v in cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else []:
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, DictConfig):
            keys += config_keys(v, key + ".")
    return keys


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    return f"; closest: {', '.join(close)}" if close else ""


def composition_error(script: str, overrides: list[str], error: Exception, compose_without) -> str:
    """One line for Hydra's refusal. `compose_without(overrides)` composes the config without the
    offending override, so the unknown key is compared with the keys the config really has."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        given = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), key)
        try:
            keys = config_keys(compose_without([o for o in overrides if o != given]))
        except Exception:  # another override is wrong too: compare with the plain config
            keys = config_keys(compose_without([]))
        return f"command line {given}: conf/{script}.yaml has no key {key}{_closest(key, keys)}"
    if m := re.search(r"Could not find '([^'/]+)/([^']+)'", text):
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return (f"command line {group}={option}: no conf/{group}/{option}.yaml{_closest(option, options)}"
                f" (available: {', '.join(options) or 'none'})")
    return f"command line: {first}"


# ---------------------------------------------------------------------------------------
# Blame: a value the user typed is the command line's, not the config file's.
# ---------------------------------------------------------------------------------------
def blame_command_line(message: str, overrides: list[str]) -> str:
    """`group/name.yaml [a.b.]field=value...` becomes `command line group.x.field=value: ...` when
    the command line set that field; a message about a file whose field the command line set
    (named in the message) says so."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or "." not in key:
            continue
        group, field = key.split(".", 1)[0], key.rsplit(".", 1)[1]
        file_ref = rf"{re.escape(group)}/[\w.-]+\.yaml"
        m = re.match(rf"{file_ref} (?:[\w.]+\.)?{re.escape(field)}=[^\s:]*:? ?", message)
        if m:
            return f"command line {key}={value}: {message[m.end():]}"
        m = re.match(rf"({file_ref}):? ", message)
        if m and re.search(rf"\b{re.escape(field)}\b", message):
            return f"command line {key}={value} ({m.group(1)}): {message[m.end():]}"
    return message


# ---------------------------------------------------------------------------------------
# Inputs: what a stage reads that an earlier stage or a make target writes.
# ---------------------------------------------------------------------------------------
def make_target_for(stage_name: str, chains: dict[str, list[str]], model: str) -> str:
    """`make pretrain` for a pre-training stage, `make post` for a post-training one."""
    for chain, specs in chains.items():
        names = {stage_of_spec(part.split(",")[0]) for spec in specs for part in spec.split("+")}
        if stage_name in names:
            target = MAKE_TARGET_OF_CHAIN.get(chain, f"launcher.py chain {chain}")
            return target + ("" if model == "tiny" else f" MODEL={model}")
    return f"the stage {stage_name}"


def stage_of_spec(head: str) -> str:
    """The stage (run folder) a chain spec's `script[:stage]` runs: the named stage, else the one
    the script's own config picks (`stage: <name>` in its defaults, or a literal `stage.name`)."""
    script, _, stage = head.partition(":")
    if stage:
        return stage
    conf = OmegaConf.load(CONF_DIR / f"{script}.yaml")
    for entry in conf.get("defaults", []):
        if isinstance(entry, DictConfig) and "stage" in entry:
            return entry["stage"]
    return OmegaConf.select(conf, "stage.name", default=script)


def _stage_inputs(cfg: DictConfig) -> list[tuple[str, str]]:
    """(config field, value) of every input that names another stage's run or a checkpoint path."""
    stage = cfg.get("stage") or {}
    fields = [(f"stage.{k}", stage.get(k)) for k in ("init_from", "reasoning_from", "instruct_from")]
    if "checkpoints" in cfg and not cfg.get("endpoint"):  # evaluate: one row per checkpoint
        fields += [(f"checkpoints.{k}", v) for k, v in cfg.checkpoints.items()]
    return [(f, str(v)) for f, v in fields if v]


def _finished(run: Path) -> bool:
    return (run / "DONE.json").exists() and (run / "checkpoints" / "latest").exists()


def input_errors(script: str, cfg: DictConfig, made_earlier: set[Path], chains: dict[str, list[str]]) -> list[str]:
    """One line per missing input of a stage: a previous stage's finished run (unless a stage
    before it in this chain makes it), the curated data, the tokenizer."""
    out, model = [], OmegaConf.select(cfg, "model.name", default="tiny")
    runs = Path(OmegaConf.select(cfg, "paths.runs", default="runs"))
    run_dir = Path(cfg.run_dir) if "run_dir" in cfg else None
    resuming = run_dir is not None and (run_dir / "checkpoints" / "latest").exists()
    for field, src in _stage_inputs(cfg):
        if field == "stage.init_from" and resuming:  # a stage that resumes does not read its init
            continue
        if Path(src).exists():
            continue
        run = runs / model / src
        if _finished(run) or run.resolve() in made_earlier:
            continue
        if field.startswith("stage.") and script != "merge_sft":  # a stage config group's own file
            field = f"stage/{cfg.stage.name}.yaml {field.removeprefix('stage.')}"
        else:
            field = f"conf/{script}.yaml {field}"
        out.append(f"{field}={src}: no finished run at {run}; `{make_target_for(src, chains, model)}` makes it")
    data_stage = OmegaConf.select(cfg, "stage.data_stage")
    if data_stage and "data" in cfg:
        manifest = Path(str(cfg.data.root)) / data_stage / "manifest.json"
        if not manifest.is_file() and not pending_data_job(cfg.data.root):  # else the chain waits for it
            out.append(f"{manifest} not found: `make data DATA={Path(str(cfg.data.root)).name}` makes it")
    if (line := replaced_result(script, cfg)) is not None:
        out.append(line)
    tok_dir = cfg.get("tokenizer_dir")
    if tok_dir and not (Path(str(tok_dir)) / "tokenizer.json").is_file():
        out.append(f"{tok_dir}/tokenizer.json not found: `make tokenizer TOKENIZER={Path(str(tok_dir)).name}` makes it")
    return out


def same_problem(message: str) -> str:
    """What two stages' lines share when they report one missing input (the run or file and
    the make target), so a chain reports it once."""
    head, sep, rest = message.partition(": ")
    return rest if sep and rest.startswith("no finished run at ") else message


def replaced_result(script: str, cfg: DictConfig) -> str | None:
    """The line refusing a stage that would replace its finished result, unless `overwrite=true`.
    Training stages never do (a finished stage resumes at its end and stops); an evaluation
    rewrites its table; a merge whose recorded inputs or alpha differ would replace its output."""
    if OmegaConf.select(cfg, "overwrite", default=False) or "run_dir" not in cfg:
        return None
    run_dir = Path(cfg.run_dir)
    if script == "evaluate" and (run_dir / "metrics.json").exists():
        return (f"{run_dir / 'metrics.json'} holds a finished evaluation: kept (overwrite=true replaces it, "
                f"run_dir=... writes elsewhere)")
    return None


def pending_data_job(data_root) -> str | None:
    """The Slurm job that will write <data_root>'s manifests (stages/curate.py records it in
    <data_root>/slurm_job.json when it submits), if it is still queued or running; else None."""
    import json
    import subprocess

    f = Path(str(data_root)) / "slurm_job.json"
    if not f.is_file():
        return None
    jid = str(json.loads(f.read_text())["job_id"])
    try:
        out = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return jid if out.returncode == 0 and out.stdout.strip() else None
