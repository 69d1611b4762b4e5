"""Every command the README and the docs pages document works as written after the set-up the
README describes."""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from insloc_detco.engine import resolve_config_file
from insloc_detco.transfer.benchmarks import get_benchmark

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(PROJECT))
README = os.path.join(REPO, "README.md")
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
PAGES = [README, os.path.join(REPO, "MODEL_ZOO.md"), *DOCS]


def documented_commands():
    """(working directory, argv) of every `python ...` line in the bash blocks of the README and
    the docs pages, with the directory the block's `cd` moves to (the repository root
    otherwise). A `torchrun ...` or `srun ...` line counts as `python SCRIPT ...` of the script
    it starts."""
    text = "\n".join(open(page).read() for page in PAGES)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        cwd = REPO
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line.startswith("cd "):
                cwd = os.path.normpath(os.path.join(cwd, line[3:].strip()))
            elif re.match(r"^(\.venv/bin/)?python3? ", line):
                commands.append((cwd, shlex.split(line.replace("[", "").replace("]", ""))))
            elif re.match(r"^(torchrun|srun) .*\.py\b", line):
                argv = shlex.split(line.replace("[", "").replace("]", ""))
                script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
                commands.append((cwd, ["python", *argv[script:]]))
    return commands


COMMANDS = documented_commands()


def test_readme_activates_the_environment_before_any_python_command():
    text = open(README).read()
    activate = text.find("source .venv/bin/activate")
    first_python = text.find("\npython ")
    assert COMMANDS, "no commands found: the parser is broken"
    assert first_python > 0, "the README shows no `python` command"
    assert 0 <= activate < first_python, "README never activates .venv before `python`"


@pytest.mark.parametrize("cwd,argv", COMMANDS, ids=[" ".join(a[:3]) for _, a in COMMANDS])
def test_documented_script_config_and_benchmark_exist(cwd, argv):
    script = os.path.join(cwd, argv[1])
    assert os.path.isfile(script), f"{argv[1]} does not exist relative to {cwd}"
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config-file":  # a path from the working directory, or a bare name
            name = argv[i + 1]
            assert os.path.isfile(os.path.join(cwd, name)) or resolve_config_file(name)
        if arg == "--benchmark":
            for name in argv[i + 1].split(","):
                get_benchmark(name)  # raises KeyError naming the unknown benchmark


SCRIPTS = sorted({os.path.join(cwd, argv[1]) for cwd, argv in COMMANDS})


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.relpath(s, REPO) for s in SCRIPTS])
def test_documented_script_starts(script):
    """`python SCRIPT --help` with the environment's python: imports resolve, arguments parse."""
    proc = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=os.path.dirname(script),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
