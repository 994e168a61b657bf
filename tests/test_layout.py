"""The README's Layout tree is the map of the house: it lists every Python file, shell script, stage
and config group, each path it lists exists, and each config group's line names all its options.
A new module that nobody wrote into the tree fails here."""

import re
import subprocess
from pathlib import Path

from conftest import ROOT

# What is not source: build outputs, virtual environments, run folders, caches.
SKIPPED_DIRS = {".venv", ".venv-vllm", "artifacts", "runs", "outputs", "multirun", "__pycache__", ".git"}
TREE_LINE = re.compile(r"^(?P<indent>(?:[│ ]   )*)[├└]── (?P<name>\S+)\s*(?:#\s?(?P<comment>.*))?$")


def readme_tree(readme: Path) -> dict[str, str]:
    """path -> comment for every entry of the ```text block under '## Layout'."""
    text = readme.read_text()
    section = text[text.index("## Layout\n"):]
    block = section[section.index("```text\n") + len("```text\n"):]
    block = block[:block.index("```")]
    entries, parents = {}, []
    for line in block.splitlines()[1:]:  # the first line is the repository's own name
        match = TREE_LINE.match(line)
        assert match, f"README Layout: line {line!r} is not a tree entry ('├── name  # comment')"
        depth = len(match["indent"]) // 4
        parents = parents[:depth]
        path = "/".join(parents + [match["name"].rstrip("/")])
        entries[path] = (match["comment"] or "").strip()
        if match["name"].endswith("/"):
            parents.append(match["name"].rstrip("/"))
    return entries


def source_files(root: Path) -> set[str]:
    found = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if path.suffix in {".py", ".sh"} and path.is_file():
            found.add(rel.as_posix())
    return found


def config_groups(root: Path) -> dict[str, list[str]]:
    """conf/<group>/ -> its option names (yaml stems, sub-folders as <folder>/)."""
    groups = {}
    for group in sorted((root / "conf").iterdir()):
        if group.is_dir():
            groups[f"conf/{group.name}"] = sorted(p.stem for p in group.glob("*.yaml"))
    return groups


def missing_from_tree(root: Path) -> list[str]:
    tree = readme_tree(root / "README.md")
    problems = [f"{path}: not in the README Layout tree" for path in sorted(source_files(root)) if path not in tree]
    problems += [f"{path}: not in the README Layout tree" for path in sorted(config_groups(root)) if path not in tree]
    problems += [f"conf/{p.name}: not in the README Layout tree" for p in sorted((root / "conf").glob("*.yaml"))
                 if f"conf/{p.name}" not in tree]
    for group, options in config_groups(root).items():
        words = set(re.findall(r"[\w.]+", tree.get(group, "")))
        problems += [f"{group}: option {option} not named on its Layout line" for option in options if option not in words]
    problems += [f"{path}: listed in the README Layout tree but does not exist" for path in tree
                 if not (root / path).exists()]
    return problems


def test_readme_tree_lists_every_file_and_config_group():
    assert missing_from_tree(ROOT) == []


def test_an_unlisted_module_fails(tmp_path):
    """The check itself: a copy of the layout with one extra module is reported by name."""
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    for rel in readme_tree(ROOT / "README.md"):
        if (ROOT / rel).is_dir():
            (tmp_path / rel).mkdir(parents=True, exist_ok=True)
        else:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).touch()
    for conf_file in (ROOT / "conf").rglob("*.yaml"):
        target = tmp_path / conf_file.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    assert missing_from_tree(tmp_path) == []
    (tmp_path / "kit" / "stray_helpers.py").touch()
    (tmp_path / "conf" / "model" / "axk1_1t.yaml").touch()
    assert missing_from_tree(tmp_path) == ["kit/stray_helpers.py: not in the README Layout tree",
                                           "conf/model: option axk1_1t not named on its Layout line"]


def test_make_help_lists_every_phony_target():
    """`make` alone prints the help; every .PHONY target has its line there (gpu and bench helpers too)."""
    makefile = (ROOT / "Makefile").read_text()
    phony = {name for line in makefile.splitlines() if line.startswith(".PHONY:") for name in line.split()[1:]}
    shown = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, check=True).stdout
    listed = set(re.findall(r"^  make (\S+)", shown, re.M))
    assert sorted(phony - listed - {"help"}) == []


def test_no_stage_script_shadows_a_recipe_module():
    """`python stages/x.py` puts stages/ first on sys.path, so a stage named like a root module
    (rl.py, merge.py, tokenizer.py, ...) would import itself instead of the recipe module."""
    root_modules = {path.stem for path in ROOT.glob("*.py")} | {"kit"}
    stage_scripts = {path.stem for path in (ROOT / "stages").glob("*.py")}
    assert sorted(root_modules & stage_scripts) == []


def test_no_file_edits_sys_path_or_pythonpath():
    """One import rule: `make setup` installs the project into the venv, so no script, test or
    bench reaches the kit by editing sys.path or setting PYTHONPATH."""
    edits = re.compile(r"sys\.path\.(insert|append)\(|PYTHONPATH=")
    found = [f"{rel}:{n}" for rel in sorted(source_files(ROOT)) + ["Makefile"]
             for n, line in enumerate((ROOT / rel).read_text().splitlines(), 1)
             if edits.search(line) and rel != "tests/test_layout.py"]
    assert found == [], found
