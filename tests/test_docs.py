"""The manual: the site builds with ``mkdocs build --strict`` (no broken links, anchors or pages), the
README stays a front page, and every command line of this project shown in a ``bash`` block of
the docs, the README or CONTRIBUTING names an entry point that exists and parses as written."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.commands import TOOLS, split_train_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
PLACEHOLDER = re.compile(r"\[|\.\.\.|\||<|>|\bNAME\b|\bN\b|\bFILE\b")  # option syntax, not a literal command

# Parses each command's arguments with the entry point's own argparse parser, stopping right
# after parse_args (nothing runs); for train.py the overrides are also applied to the recipe.
PARSE_ONLY = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(Exception):
    pass

original = argparse.ArgumentParser.parse_args

def parse_args(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))

argparse.ArgumentParser.parse_args = parse_args
entry, commands = sys.argv[1], json.loads(sys.argv[2])
failures = {}
for i, argv in enumerate(commands):
    sys.argv = [entry, *argv]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            if entry.endswith(".py"):
                runpy.run_path(entry, run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        failures[i] = "ran without parsing arguments"
    except Parsed as parsed:
        if entry == "train.py":
            from pipeline.config import ConfigError, load_config, recipe_path
            args = parsed.args[0]
            try:
                load_config(recipe_path(args.config), args.overrides)
            except ConfigError as exc:
                failures[i] = str(exc)
    except SystemExit as exc:  # argparse: 0 after --help, 2 for arguments it does not accept
        if exc.code not in (0, None):
            failures[i] = (errors.getvalue().strip().splitlines() or [f"exit {exc.code}"])[-1]
print(json.dumps(failures))
"""


def bash_blocks(path: Path):
    """(line number, command) for each command of each ```bash block, continuation lines joined."""
    lines = path.read_text().split("\n")
    inside, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```shell") and not inside
            continue
        if not inside:
            continue
        if not pending:
            start = number
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            yield start, pending.strip()
            pending = ""


def entry_point(command: str) -> tuple[str, list[str]] | None:
    """The project's entry point a shell command runs, and its arguments; None for other tools."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    program = words[0].removeprefix(".venv/bin/")
    rest = words[1:]
    if program == "googlenet" and rest and not rest[0].startswith("-"):  # googlenet COMMAND: the tool it runs
        if rest[0] == "train":
            try:
                return "train.py", split_train_args(rest[1:])[1]
            except ValueError:
                return "googlenet train", rest[1:]  # an option neither accelerate launch nor train.py takes
        return (TOOLS[rest[0]].module if rest[0] in TOOLS else f"googlenet {rest[0]}"), rest[1:]
    if program == "accelerate" and rest[:1] == ["launch"]:
        rest = rest[1:]
        while rest and rest[0] != "-m" and not rest[0].endswith(".py"):
            rest = rest[1:]
        program = "python"
    if program not in ("python", "python3"):
        return None
    if rest[:1] == ["-m"] and len(rest) > 1:
        module = rest[1]
        if module.split(".")[0] in ("data_prep", "imaging", "shards", "pipeline", "benchmarks"):
            return module, rest[2:]
    elif rest and rest[0].endswith(".py"):
        return rest[0], rest[1:]  # a script: the test reports it if it does not exist
    return None


def project_commands():
    found = []
    for page in PAGES:
        for line, command in bash_blocks(page):
            for part in re.split(r"\s(?:&&|;|\|\|)\s", command):
                entry = entry_point(part)
                if entry:
                    found.append((f"{page.relative_to(ROOT)}:{line}", part, *entry))
    return found


COMMANDS = project_commands()


def run_each(commands: list[list[str]], timeout: int) -> list[subprocess.CompletedProcess]:
    """Each command in its own process, as many at once as there are cores: each one mostly
    imports torch, on one core."""
    def run(command):
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        return list(pool.map(run, commands))


def test_the_manual_shows_the_main_entry_points():
    entries = {entry for _, _, entry, _ in COMMANDS}
    for expected in ("train.py", "data_prep", "pipeline.inference.evaluate", "pipeline.inference.predict",
                     "pipeline.inference.export", "pipeline.train.report", "pipeline.ops.slurm",
                     "imaging.jpeg_region"):
        assert expected in entries, f"no command in the docs runs {expected}"


def test_every_googlenet_command_in_the_docs_exists():
    unknown = [f"{where}: {command}" for where, command, entry, _ in COMMANDS if entry.startswith("googlenet ")]
    assert not unknown, f"googlenet commands in the docs that are not one of {', '.join(TOOLS)}:\n" + "\n".join(unknown)


@pytest.mark.slow
def test_every_entry_point_in_the_docs_exists_and_answers_help():
    missing = [f"{where}: {entry}" for where, _, entry, _ in COMMANDS
               if entry.endswith(".py") and not (ROOT / entry).is_file()]
    assert not missing, "scripts named in the docs that do not exist:\n" + "\n".join(missing)
    helps = {(entry, argv[0]) if entry == "data_prep" and argv and not argv[0].startswith("-") else (entry, None)
             for _, _, entry, argv in COMMANDS}
    helps = sorted(((entry, sub) for entry, sub in helps if entry != "imaging.jpeg_region"), key=str)  # build: below
    commands = [[sys.executable, *([entry] if entry.endswith(".py") else ["-m", entry]), *([sub] if sub else []),
                 "--help"] for entry, sub in helps]
    for (entry, sub), result in zip(helps, run_each(commands, timeout=300)):
        assert result.returncode == 0 and "usage" in result.stdout.lower(), \
            f"{entry} {sub or ''} --help: exit {result.returncode}\n{result.stderr[-2000:]}"


@pytest.mark.slow
def test_every_command_in_the_docs_parses_as_written():
    by_entry = defaultdict(list)
    for where, command, entry, argv in COMMANDS:
        if PLACEHOLDER.search(command) or entry == "imaging.jpeg_region":
            continue
        by_entry[entry].append((where, command, argv))
    assert sum(map(len, by_entry.values())) >= 20, "too few literal commands found: is the extraction broken?"
    failures = []
    entries = sorted(by_entry)
    results = run_each([[sys.executable, "-c", PARSE_ONLY, entry, json.dumps([argv for *_, argv in by_entry[entry]])]
                        for entry in entries], timeout=600)  # one process per entry point
    for entry, result in zip(entries, results):
        assert result.returncode == 0, f"{entry}: {result.stderr[-2000:]}"
        for index, error in json.loads(result.stdout.strip().splitlines()[-1]).items():
            where, command, _ = by_entry[entry][int(index)]
            failures.append(f"{where}: {command}\n    {error}")
    assert not failures, "commands in the docs that do not parse:\n" + "\n".join(failures)


def test_the_c_library_build_command_is_the_one_setup_runs():
    assert "python -m imaging.jpeg_region build" in (ROOT / "scripts" / "setup.sh").read_text()
    usage = subprocess.run([sys.executable, "-m", "imaging.jpeg_region"], cwd=ROOT, capture_output=True, text=True)
    assert "imaging.jpeg_region build" in usage.stderr + usage.stdout


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first = next(b for _, b in bash_blocks(ROOT / "README.md"))
    assert first.startswith("bash scripts/setup.sh && .venv/bin/accelerate launch train.py")
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in readme
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f": {p.name}" not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    for page in (ROOT / "docs").glob("*.md"):
        expected = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert expected in built, f"{page.name} was not built"
    assert "The path of one training batch" in (tmp_path / "site" / "architecture" / "index.html").read_text()
    # CONTRIBUTING.md is included into the site, not copied
    assert "Conventions" in (tmp_path / "site" / "contributing" / "index.html").read_text()
