"""Every command the docs show in a fenced ``bash`` block exists and takes the options shown.

Commands are taken from README.md, README_KD.md and docs/**/*.md and checked from the repository root:

* every ``python SCRIPT ...`` is parsed by the script's own argparse parser, in this process, without
  running it (the parser is stopped right after parsing), so an unknown option, subcommand or choice
  fails; its ``--help`` must print and exit 0;
* the quick ones (``QUICK``: the tiny teacher, the importance tools on the miniature world, the setup
  check) are then run fully, in a scratch folder that links the repository's files (outputs such as
  ``work_dirs/`` land there);
* ``bash adzoo/orion/orion_dist_train.sh CONFIG GPUS [args]``: the config must exist and the extra
  arguments are parsed by ``adzoo/orion/train_kd.py``'s parser;
* ``make TARGET`` must name a target of the Makefile; ``python -m pytest PATH`` a path that exists;
* a command that needs an ORION checkout or a GPU is listed in ``NOT_RUN_HERE`` with the reason, and is
  only parsed (GPU tools of other projects there, such as TensorRT's, are not checked); any other command
  must be one of ``EXTERNAL`` (shell built-ins and common tools).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("python", "python3", ".venv/bin/python")
EXTERNAL = ("source", "cd", "export", "cp", "mkdir", "ls", "cat", "git", "pip", "conda", "echo", "sha256sum")

#: Scripts (or script + first argument) that need an ORION checkout or a GPU: parsed only, with the reason.
NOT_RUN_HERE = {
    "tools/install_into_orion.py": "needs an ORION checkout (PATH/TO/Orion)",
    "adzoo/orion/orion_dist_eval.sh": "ORION's own evaluation launcher, in an ORION checkout only",
    "tools/gpu_check.sh": "needs CUDA GPUs (checked for shell syntax only)",
    "adzoo/orion/configs/orion_stage3_kd_train.py": "ORION's stage-3 config: needs an ORION checkout and GPUs",
    "trtexec": "TensorRT's engine builder: needs TensorRT and a GPU (not checked)",
    "polygraphy": "TensorRT's comparison tool: needs TensorRT and a GPU (not checked)",
}
#: Commands run fully (seconds each on the miniature world): (script, first argument).
QUICK = {("tools/train_tiny_teacher.py", "--materialize"), ("tools/head_pruning_utils.py", "importance"),
         ("tools/head_pruning_utils.py", "prune-config"), ("tools/head_pruning_utils.py", "analyze"),
         ("tools/head_pruning_utils.py", "plot"), ("demo_kd_50_pruning.py", "--check-setup")}


class Command(NamedTuple):
    where: str  # file:line of the block's command
    argv: Tuple[str, ...]


def doc_files(root: Path = ROOT) -> List[Path]:
    files = [root / "README.md", root / "README_KD.md"] + sorted((root / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


_FENCE = re.compile(r"^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```", re.S | re.M)
_VAR = re.compile(r"\$\{?(\w+)\}?")


def _logical_lines(body: str, first_line: int) -> Iterator[Tuple[int, str]]:
    """Lines with backslash continuations joined, numbered by their first line."""
    pending, start = "", first_line
    for offset, line in enumerate(body.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _split_commands(line: str) -> List[List[str]]:
    """Shell words of ``line`` (comments dropped), split at ``;``, ``&&``, ``||`` and ``|``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.wordchars += "${}"
    commands: List[List[str]] = [[]]
    for token in lexer:
        if token in (";", "&&", "||", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _expand(words: Sequence[str], variables: Dict[str, str]) -> List[str]:
    """``$NAME`` / ``${NAME}`` substituted; a word that is only a variable is split as the shell would."""
    out: List[str] = []
    for word in words:
        whole = re.fullmatch(r"\$\{?(\w+)\}?", word)
        if whole and whole.group(1) in variables:
            out.extend(shlex.split(variables[whole.group(1)]))
        else:
            out.append(_VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), word))
    return out


def doc_blocks(root: Path = ROOT) -> List[Tuple[str, List[Command]]]:
    """Every fenced bash block (its file:line) with its commands in order, shell variables substituted."""
    out: List[Tuple[str, List[Command]]] = []
    for path in doc_files(root):
        text = path.read_text()
        for match in _FENCE.finditer(text):
            if match.group("lang") not in ("bash", "sh", "shell"):
                continue
            first = text.count("\n", 0, match.start("body")) + 1
            variables: Dict[str, str] = {}
            commands: List[Command] = []
            for number, line in _logical_lines(match.group("body"), first):
                for words in _split_commands(line):
                    words = _expand(words, variables)
                    if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
                        name, _, value = words[0].partition("=")
                        variables[name] = value
                        continue
                    commands.append(Command(f"{path.relative_to(root)}:{number}", tuple(words)))
            out.append((f"{path.relative_to(root)}:{first - 1}", commands))
    return out


# --------------------------------------------------------------------------- parsing a script's command line

class _Parsed(BaseException):
    """Raised by the patched parser once the command line parsed: the script stops before doing anything
    (a BaseException, so that an entry point's catch-all error handler lets it through)."""


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Optional[Sequence[str]] = None,
                        namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        raise _Parsed(real(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]


def run_script(script: str, args: Sequence[str], cwd: Path, parse_only: bool) -> Tuple[object, str]:
    """``python script args`` in this process from ``cwd``: (the exit status or 'parsed', stderr + stdout)."""
    out, err = io.StringIO(), io.StringIO()
    argv, old_cwd, old_path = sys.argv, os.getcwd(), list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, str((ROOT / script).parent))
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                (_stop_after_parsing() if parse_only else contextlib.nullcontext()):
            runpy.run_path(str(ROOT / script), run_name="__main__")
        status: object = 0
    except _Parsed:
        status = "parsed"
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, old_path
        os.chdir(old_cwd)
    return status, err.getvalue() + out.getvalue()


def _script_and_args(argv: Sequence[str]) -> Tuple[str, List[str]]:
    script = argv[1]
    return (script[2:] if script.startswith("./") else script), list(argv[2:])


def _not_run_here(script: str, args: Sequence[str]) -> Optional[str]:
    for key in [script, *args]:
        if key in NOT_RUN_HERE:
            return NOT_RUN_HERE[key]
    if any("PATH/TO" in a for a in args):
        return "needs an ORION checkout"
    placeholders = [a for a in args if re.fullmatch(r"[A-Z][A-Z_]+", a)]
    return f"placeholders {placeholders} stand for the reader's files" if placeholders else None


# --------------------------------------------------------------------------- the checks

BLOCKS = doc_blocks()
COMMANDS = [command for _, commands in BLOCKS for command in commands]


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory) -> Path:
    """A folder that links every top-level entry of the repository, except the outputs (work_dirs)."""
    root = tmp_path_factory.mktemp("doc_root")
    for entry in ROOT.iterdir():
        if entry.name not in ("work_dirs", ".git"):
            (root / entry.name).symlink_to(entry)
    return root


def test_the_docs_show_commands():
    scripts = {c.argv[1] for c in COMMANDS if c.argv[0] in PYTHONS}
    assert "demo_kd_50_pruning.py" in scripts and len(COMMANDS) >= 10, [c.where for c in COMMANDS]


def test_every_help_prints():
    """``--help`` of every script the docs run (and of each subcommand shown), all in this process."""
    seen = set()
    for command in COMMANDS:
        if command.argv[0] not in PYTHONS or command.argv[1] == "-m":
            continue
        script, args = _script_and_args(command.argv)
        sub = [args[0]] if args and not args[0].startswith("-") and not (ROOT / args[0]).exists() else []
        if (script, *sub) in seen or not (ROOT / script).is_file():
            continue
        seen.add((script, *sub))
        status, output = run_script(script, [*sub, "--help"], ROOT, parse_only=False)
        assert status == 0 and "usage:" in output, f"{command.where}: {script} {' '.join(sub)} --help: {output}"


@pytest.mark.parametrize("commands", [c for _, c in BLOCKS], ids=[where for where, _ in BLOCKS])
def test_doc_block(commands: List[Command], scratch_root: Path):
    """The commands of one block, in order (a later one may read what an earlier one wrote)."""
    for command in commands:
        _check(command, scratch_root)


def _check(command: Command, scratch_root: Path) -> None:
    argv = command.argv
    if argv[0] in PYTHONS and argv[1:2] == ("-m",):
        assert argv[2] in ("pytest", "pip"), f"{command.where}: python -m {argv[2]} is not a known module"
        missing = [a for a in argv[3:] if not a.startswith("-") and not (ROOT / a.split("::")[0]).exists()]
        assert not missing, f"{command.where}: no such test path {missing}"
    elif argv[0] in PYTHONS:
        _check_python(command, scratch_root)
    elif argv[0] == "bash" or argv[0].startswith("./"):
        _check_shell_script(command)
    elif argv[0] == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert set(argv[1:]) <= targets, f"{command.where}: make {' '.join(argv[1:])}: no such target in Makefile"
    elif argv[0] not in NOT_RUN_HERE:
        assert argv[0] in EXTERNAL, f"{command.where}: '{argv[0]}' is neither a repository command nor a known tool"


def _check_python(command: Command, scratch_root: Path) -> None:
    script, args = _script_and_args(command.argv)
    assert (ROOT / script).is_file(), f"{command.where}: {script} does not exist"
    status, output = run_script(script, args, ROOT, parse_only=True)
    assert status == "parsed", \
        f"{command.where}: {' '.join(command.argv)}: not accepted by its parser: {output.strip().splitlines()[-1:]}"
    quick = (script, args[0] if args else "") in QUICK
    if quick and _not_run_here(script, args) is None:
        status, output = run_script(script, args, scratch_root, parse_only=False)
        assert status == 0, f"{command.where}: {' '.join(command.argv)} failed (exit {status}): {output[-2000:]}"


def _check_shell_script(command: Command) -> None:
    argv = list(command.argv[1:] if command.argv[0] == "bash" else command.argv)
    script = argv[0][2:] if argv[0].startswith("./") else argv[0]
    if script in NOT_RUN_HERE and not (ROOT / script).is_file():
        return  # ORION's own script (see NOT_RUN_HERE)
    assert (ROOT / script).is_file(), f"{command.where}: {script} does not exist"
    syntax = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, f"{command.where}: {script}: {syntax.stderr}"
    if script == "adzoo/orion/orion_dist_train.sh":
        assert len(argv) >= 3 and (ROOT / argv[1]).is_file() and argv[2].isdigit(), \
            f"{command.where}: expected orion_dist_train.sh CONFIG GPUS, got {argv[1:]}"
        status, output = run_script("adzoo/orion/train_kd.py", [argv[1], "--launcher", "pytorch", *argv[3:]], ROOT,
                                    parse_only=True)
        assert status == "parsed", f"{command.where}: train_kd.py does not accept {argv[3:]}: {output}"


@pytest.mark.parametrize("line, reason", [
    ("python tools/train_tiny_teacher.py --no-such-option", "not accepted by its parser"),
    ("python tools/head_pruning_utils.py no-such-command", "not accepted by its parser"),
    ("python tools/no_such_script.py --help", "does not exist"),
    ("bash adzoo/orion/orion_dist_train.sh adzoo/orion/configs/orion_tiny_kd_train.py 1 --no-such-option",
     "does not accept"),
    ("make no-such-target", "no such target"),
    ("frobnicate --now", "neither a repository command nor a known tool"),
])
def test_the_check_refuses_a_command_or_option_that_does_not_exist(tmp_path, scratch_root, line, reason):
    (tmp_path / "README.md").write_text(f"Run:\n\n```bash\nX=1; {line}  # a comment\n```\n")
    [(where, commands)] = doc_blocks(tmp_path)
    assert where == "README.md:3" and len(commands) == 1
    with pytest.raises(AssertionError, match=reason):
        _check(commands[0], scratch_root)


def test_shell_variables_and_continuations_are_followed(tmp_path):
    (tmp_path / "README.md").write_text('```bash\nS="python tools/kd_study.py --out w"; C=cfg.py\n'
                                        '$S --ratios 0.5 \\\n    --config ${C}   # both\n```\n')
    [(_, [command])] = doc_blocks(tmp_path)
    assert command == Command("README.md:3", ("python", "tools/kd_study.py", "--out", "w", "--ratios", "0.5",
                                              "--config", "cfg.py"))
