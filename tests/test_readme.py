"""README.md runs as written: every ```python block executes on its own, and every shell command of the README and
of the configs/*.py headers is run (at tiny scale) by a test that quotes it verbatim.

Python blocks run in one subprocess, each in a fresh namespace (so a block that uses a name it does not define
fails here), with the working directory a temporary folder holding a link to configs/. A block that must not run
(pod-scale only) would open with the line `# readme: not run (<why>)`; none does today.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = "# readme: not run"
# Test files that run documented commands (each quotes the command verbatim, via `documented`).
COMMAND_TESTS = ("tests/test_cli.py", "tests/test_configs.py", "tests/test_readme.py", "tests/elastic/test_cli.py")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every ``` fenced block of a markdown text, in order ("" for a plain block)."""
    blocks, info, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, body = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(body) + "\n"))
                info = None
        elif info is not None:
            body.append(line)
    assert info is None, "an unclosed ``` block"
    return blocks


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a markdown text, in order."""
    return [body for info, body in fenced_blocks(text) if info == "python"]


def _commands_in(lines: list[str]) -> list[str]:
    """Shell commands (`nemojax ...`, `make ...`, `python ...`) among `lines`, trailing `# comments` dropped and
    backslash continuations joined."""
    commands, pending = [], ""
    for line in lines:
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        line = re.split(r"\s{2,}[#(]", line)[0].strip()  # "cmd   # comment" or "cmd   (a note)"
        if re.match(r"(nemojax|make|python) ", line):
            commands.append(line)
    return commands


def readme_commands(text: str) -> list[str]:
    """The commands of the README's plain ``` (shell) blocks."""
    return [c for info, body in fenced_blocks(text) if info == "" for c in _commands_in(body.splitlines())]


def config_commands(path: Path) -> list[str]:
    """The commands of a config file's header comment (its leading `#` lines)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    return _commands_in(header)


def all_documented_commands() -> list[str]:
    commands = readme_commands(README.read_text())
    for path in sorted((ROOT / "configs").glob("*.py")):
        commands += config_commands(path)
    return commands


def documented(command: str) -> list[str]:
    """`command` as argv (without the program name), after checking that README.md or a config header states it
    verbatim: the tests run exactly what the documentation tells a user to type."""
    assert command in all_documented_commands(), f"{command!r} is not a documented command"
    return shlex.split(command)[1:]  # "make demo" -> ["demo"], "nemojax train ..." -> ["train", ...]


def test_the_documented_commands_are_found():
    """The extraction sees the commands a reader sees (a hand-checked sample), comments and continuations
    handled."""
    commands = all_documented_commands()
    assert "make demo" in commands and "make notebooks" in commands
    assert "nemojax memory --preset nemotron-nano-9b-v2 --context 131072 --budget-gib 22" in commands
    assert any(c.startswith("nemojax train --config configs/nemotron_h_8b.py --workdir gs://") and
               "--config.data.tokenizer=" in c for c in commands)  # a continued line, joined
    assert not any("#" in c for c in commands)


def test_every_documented_command_is_run_by_a_test():
    """Each command of README.md and the config headers is quoted verbatim, as `documented("...")`, by a test that
    runs it."""
    sources = "\n".join((ROOT / name).read_text() for name in COMMAND_TESTS)
    missing = [c for c in all_documented_commands()
               if not re.search(r"""documented\((\"\"\"|"|')""" + re.escape(c), sources)]
    assert not missing, f"documented commands no test runs: {missing}"


def test_make_targets_run_the_documented_jobs():
    """`make demo`, `make test` and `make notebooks` run what the README says (a dry run: the suite cannot run
    itself; the demo job and the notebooks have their own tests)."""
    def recipe(argv: list[str]) -> str:
        # Under `make test` the parent make's MAKELEVEL/MAKEFLAGS would add "Entering directory" lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
        out = subprocess.run(["make", "--no-print-directory", "-n", *argv], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True).stdout
        return out.strip().splitlines()[-1]

    assert recipe(documented("make demo")).endswith("-m nemojax.cli demo --workdir runs/demo")
    assert "-m pytest" in recipe(documented("make test"))
    assert "notebooks/execute.py" in recipe(documented("make notebooks"))


def test_readme_python_blocks_run(tmp_path):
    """Every ```python block of README.md runs on its own (tiny presets, a few steps) and prints what it says."""
    blocks = [b for b in python_blocks(README.read_text()) if not b.startswith(NOT_RUN)]
    assert len(blocks) >= 6
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    script = tmp_path / "run_blocks.py"
    script.write_text(
        "import sys\n"
        "blocks = " + repr(blocks) + "\n"
        "for i, block in enumerate(blocks):\n"
        "    print(f'--- block {i}', flush=True)\n"
        "    exec(compile(block, f'README.md python block {i}', 'exec'), {'__name__': '__main__'})\n")
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("--- block") == len(blocks)
    assert "123611033088" in proc.stdout  # Super's published parameter count, from shapes
    assert "fits" in proc.stdout or "GiB" in proc.stdout  # the memory plan's table
    assert (tmp_path / "out" / "nvfp4" / "hf_quant_config.json").is_file()


def test_newcomer_attribute_paths_exist_after_import_nemojax():
    """`import nemojax` alone makes README's `nemojax.infer.chat.chat` and `nemojax.infer.load_checkpoint` work
    (a fresh interpreter: another test's imports must not hide a missing one)."""
    code = ("import nemojax, inspect; "
            "print(inspect.signature(nemojax.infer.chat.chat).parameters['thinking_budget'].name, "
            "nemojax.infer.load_checkpoint.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["thinking_budget", "load_checkpoint"]


def test_documented_helper_refuses_undocumented_commands():
    command = "nemojax memory --preset nemotron-nano-9b-v2 --context 131072 --budget-gib 22"
    assert documented(command)[:3] == ["memory", "--preset", "nemotron-nano-9b-v2"]
    with pytest.raises(AssertionError, match="is not a documented command"):
        documented(command + " --batch 2")
