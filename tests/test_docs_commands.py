"""The documentation's commands are right as written.

Reads the fenced shell blocks of README.md, CONTRIBUTING.md, docs/*.md and docs/results/*.md (not the dated
notebook, which is history, nor the generated reference, which test_reference checks). The convention, stated in
docs/README.md: a block's info string is a shell (```bash) with, where it cannot run on a fresh clone as written,
one marker saying why (data, cluster, gpu, template). For every command, marked or not: each `python -m` module
(also after torchrun, and each dr-* script's module) exists, each --option it passes is one of the options of that
module's parser, each `python bench/x.py` script exists with the options its parser has, each section.key=value
names a config key, and each --config file exists. The commands of unmarked blocks that only print (--help,
--print-config, --dry-run, --print-arms) are run with this Python and must exit 0 without writing into the
repository.

A command's parser is read without running the command: a module's build_parser() where it has one, else its
main([]) with argparse's parse methods replaced by one that hands the parser back before anything else happens
(most CLIs here build their parser inside main).
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dr_resnet import config

from helpers import REPO

DOCS = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md"),
               *(REPO / "docs" / "results").glob("*.md")])
SHELLS = {"bash", "sh", "shell"}
CANNOT_RUN_HERE = {  # a shell block's second word: why its commands do not run on a fresh clone as written
    "data": "needs a real dataset at the paths shown",
    "cluster": "needs a SLURM cluster or several machines",
    "gpu": "needs a GPU with CUDA",
    "template": "a pattern with placeholders to fill in",
}
PRINT_ONLY = {"--help", "-h", "--print-config", "--dry-run", "--print-arms"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
PYTHON = re.compile(r"^python(3(\.\d+)?)?$")
OVERRIDE = re.compile(r"^([a-z_]+)\.([a-z_0-9]+)=")  # section.key=value (a placeholder such as data.KEY=VALUE is not)
FENCE = re.compile(r"^(`{3,}|~{3,})\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class Command:
    """One shell command of a fenced block: where it is, its words, and the block's marker ('' : runs here)."""

    where: str  # file:line
    words: tuple[str, ...]
    marker: str


@dataclasses.dataclass(frozen=True)
class Invocation:
    """A Python program a command starts: a module (`python -m`, torchrun, a dr-* script) or a script file."""

    module: str  # '' for a script
    script: str  # '' for a module
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    launcher: str  # python, torchrun or a dr-* script
    launcher_options: tuple[str, ...]  # before -m (python's own, or torchrun's)


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the opening fence, info string, the block's lines) for every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if not opening:
            i += 1
            continue
        fence, info, body, j = opening.group(1), opening.group(2).strip(), [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and not lines[j].strip()[len(fence):].strip()
                                      and lines[j].strip()[0] == fence[0]):
            body.append(lines[j])
            j += 1
        blocks.append((i + 1, info, body))
        i = j + 1
    return blocks


def commands_of(path: Path) -> list[Command]:
    """The commands of a file's shell blocks: continued lines (a trailing backslash) joined, comments dropped."""
    found = []
    name = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    for start, info, body in fenced_blocks(path.read_text()):
        words = info.split()
        if not words or words[0] not in SHELLS:
            continue
        marker = words[1] if len(words) > 1 else ""
        pending, first = "", 0
        for offset, line in enumerate(body, start=start + 1):
            if not pending:
                first = offset
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            text = (pending + stripped).strip()
            pending = ""
            tokens = shlex.split(text, comments=True) if text else []
            if tokens:
                found.append(Command(f"{name}:{first}", tuple(tokens), marker))
    return found


@functools.cache
def console_scripts() -> dict[str, str]:
    """dr-* script -> the module whose main it runs (setup.cfg's entry points)."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        scripts[name] = target.split(":")[0]
    return scripts


def invocations(words: tuple[str, ...]) -> list[Invocation]:
    """The Python programs a command line starts, each with its own arguments (up to a |, &&, ; ...)."""
    found, segment = [], []
    for word in (*words, ";"):
        if word not in SEPARATORS:
            segment.append(word)
            continue
        env = []
        while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):
            env.append(tuple(segment.pop(0).split("=", 1)))
        if segment:
            program, rest = segment[0], segment[1:]
            found += _invocation(Path(program).name, rest, tuple(env))
        segment = []
    return found


def _invocation(program: str, rest: list[str], env: tuple) -> list[Invocation]:
    if program in console_scripts():
        return [Invocation(console_scripts()[program], "", tuple(rest), env, program, ())]
    if not (PYTHON.match(program) or program == "torchrun"):
        return []
    launcher = "torchrun" if program == "torchrun" else "python"
    options = []
    for k, word in enumerate(rest):
        if word == "-m" and k + 1 < len(rest):
            return [Invocation(rest[k + 1], "", tuple(rest[k + 2:]), env, launcher, tuple(options))]
        if word.endswith(".py"):
            return [Invocation("", word, tuple(rest[k + 1:]), env, launcher, tuple(options))]
        if word == "-c":
            return []
        options.append(word)
    return []


class _Parser(BaseException):
    """Carries a parser out of a main() that was about to parse (a BaseException: no `except Exception` holds it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def _hand_back(self, *args, **kwargs):
    raise _Parser(self)


def parser_from(main: typing.Callable, *args) -> argparse.ArgumentParser | None:
    """The parser main() builds, taken from it as it starts to parse; None if it returns without parsing."""
    names = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")
    saved = {name: getattr(argparse.ArgumentParser, name) for name in names}
    try:
        for name in names:
            setattr(argparse.ArgumentParser, name, _hand_back)
        main(*args)
    except _Parser as handed:
        return handed.parser
    finally:
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    return None


@functools.cache
def module_parser(module: str) -> argparse.ArgumentParser | None:
    """The argparse parser of a `python -m` module: its build_parser() (or its main's module's), else main([])'s."""
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    for owner in (mod, sys.modules.get(getattr(main, "__module__", ""), None)):
        build = getattr(owner, "build_parser", None)
        if callable(build):
            return build()
    return parser_from(main, []) if callable(main) else None


@functools.cache
def script_parser(script: str) -> argparse.ArgumentParser | None:
    """The parser a script's main() builds (bench/ scripts parse sys.argv inside main)."""
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # as `python bench/x.py` has it: a script imports its neighbours
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    main = getattr(mod, "main", None)
    return parser_from(main) if callable(main) else None


SECTIONS = typing.get_type_hints(config.Config)  # section -> its dataclass
KEYS = {f"{section}.{field.name}" for section, kind in SECTIONS.items() for field in dataclasses.fields(kind)}


def exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is missing
        return False


CHOICES = {k.key: tuple(str(c) for c in k.choices) for k in config.key_help() if k.choices}  # a Literal key's values


def choices_of(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """Each option with choices, and them as text."""
    return {option: tuple(str(c) for c in action.choices) for action in parser._actions if action.choices
            for option in action.option_strings}


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def problems(command: Command) -> list[str]:
    """What is wrong in a command: modules, scripts, options, config keys and --config files that do not exist."""
    found = []
    for word in command.words:  # overrides pass through sbatch and slurm/sweep.sh too: every key is checked
        key = OVERRIDE.match(word)
        if key and key.group(1) in SECTIONS and f"{key.group(1)}.{key.group(2)}" not in KEYS:
            found.append(f"{word.split('=')[0]}: no such config key")
        elif key and key.group(1) in SECTIONS:
            name, value = word.split("=", 1)
            allowed = CHOICES.get(name)
            if allowed and value.islower() and value not in allowed:  # an upper-case value is a placeholder
                found.append(f"{name}={value}: not one of {', '.join(allowed)}")
    for call in invocations(command.words):
        if call.module:
            if not exists(call.module):
                found.append(f"python -m {call.module}: no such module")
                continue
            parser, name = module_parser(call.module), f"python -m {call.module}"
        else:
            if not (REPO / call.script).is_file():
                found.append(f"{call.script}: no such script")
                continue
            parser, name = script_parser(call.script), call.script
        known = options_of(parser) if parser else None
        for k, word in enumerate(call.args):
            option = word.strip("[](),").split("=", 1)[0]
            if re.match(r"^--?[a-zA-Z][\w-]*$", option) and known is not None and option not in known:
                found.append(f"{name}: no option {option}")
            allowed = choices_of(parser).get(option) if parser else None
            value = (word.split("=", 1)[1] if "=" in word else call.args[k + 1] if k + 1 < len(call.args) else "").strip("[](),")
            # a placeholder (upper case, or the choices spelled a|b|c) is no value
            if allowed and value.islower() and "|" not in value and value not in allowed:
                found.append(f"{name} {option} {value}: not one of {', '.join(allowed)}")
            if option == "--config" and k + 1 < len(call.args):
                named = call.args[k + 1]
                if named.islower() and not (REPO / named).is_file():
                    found.append(f"{name} --config {named}: no such file")
    return found


def runnable(command: Command) -> list[Invocation]:
    """The print-only invocations of a command in an unmarked block, started by python or a dr-* script (torchrun
    starts processes): these run here."""
    if command.marker:
        return []
    return [call for call in invocations(command.words)
            if call.module and call.launcher != "torchrun" and PRINT_ONLY & set(call.args)]


ALL = [command for path in DOCS for command in commands_of(path)]
RUNS = [(command, call) for command in ALL for call in runnable(command)]


def test_the_pages_are_found_and_hold_commands():
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    assert {"README.md", "docs/README.md", "docs/data.md", "docs/configuration.md", "docs/training.md"} <= names
    readme = [c for c in ALL if c.where.startswith("README.md:")]
    modules = [call.module for c in readme for call in invocations(c.words) if call.module.startswith(("dr_", "launch"))]
    # the five commands from a download folder to the report, in order
    assert modules[:5] == ["dr_resnet.describe", "dr_resnet.split", "dr_resnet.preprocess", "launch.sweep",
                           "dr_resnet.report"]
    assert len(RUNS) >= 8


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_fence_says_what_it_holds(path):
    """A fence names its language, and a shell block's marker is one of CANNOT_RUN_HERE's: a typo in a marker
    would otherwise take its commands out of the run silently."""
    wrong = []
    for line, info, _ in fenced_blocks(path.read_text()):
        words = info.split()
        if not words:
            wrong.append(f"line {line}: a fence without an info string (```bash, ```python, ...)")
        elif words[0] in SHELLS and (len(words) > 2 or (len(words) == 2 and words[1] not in CANNOT_RUN_HERE)):
            wrong.append(f"line {line}: ```{info}: the marker must be one of {', '.join(CANNOT_RUN_HERE)}")
    assert not wrong, f"{path.relative_to(REPO)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_documented_commands_name_real_modules_options_and_keys(path):
    wrong = [f"{c.where}: {problem}" for c in commands_of(path) for problem in problems(c)]
    assert not wrong, "\n".join(wrong)


def _run(call: Invocation) -> subprocess.CompletedProcess:
    env = {**os.environ, **dict(call.env),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *call.launcher_options, "-m", call.module, *call.args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def _written() -> set[str]:
    """What the repository's root, runs/ and data/ hold: a command that writes a run or a dataset adds to it."""
    return {str(p.relative_to(REPO)) for folder in (REPO, REPO / "runs", REPO / "data") if folder.is_dir()
            for p in folder.iterdir()}


@pytest.fixture(scope="module")
def ran() -> tuple[dict[int, subprocess.CompletedProcess], set[str]]:
    """Every print-only command run once, a few at a time (each mostly imports torch); and what they added to the
    repository."""
    before = _written()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(enumerate(pool.map(_run, [call for _, call in RUNS])))
    return results, _written() - before


@pytest.mark.parametrize("index", range(len(RUNS)), ids=[f"{c.where} {call.module}" for c, call in RUNS])
def test_print_only_commands_run(index, ran):
    command, call = RUNS[index]
    result = ran[0][index]
    assert result.returncode == 0, (f"{command.where}: python -m {call.module} {' '.join(call.args)}\n"
                                    f"exit {result.returncode}\n{result.stderr[-3000:]}")
    assert result.stdout.strip(), f"{command.where}: printed nothing"


def test_print_only_commands_write_nothing_into_the_repository(ran):
    """They ran (the fixture) with the repository as their working folder: no run, sweep or data folder appeared."""
    assert not ran[1]


LINK = re.compile(r"\]\(([^)\s#]+)?(#[^)\s]*)?\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(path: Path) -> list[str]:
    """The page's relative links (and #anchors) that lead nowhere. docs/reference/ is generated by its own command;
    where a checkout has not generated it yet, links into it are not judged."""
    found = []
    for target, anchor in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        linked = (path.parent / target).resolve() if target else path
        if linked.is_relative_to(REPO / "docs" / "reference") and not (REPO / "docs" / "reference").is_dir():
            continue
        if not linked.exists():
            found.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md":
            headings = {slug(h) for h in re.findall(r"^#+ (.*)$", linked.read_text(), re.M)}
            if anchor[1:] not in headings:
                found.append(f"{target}{anchor}: no such heading")
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_lead_somewhere(path):
    assert not broken_links(path), f"{path.relative_to(REPO)}: " + ", ".join(broken_links(path))


DEFAULT_ROW = re.compile(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| ([^|]+) \|", re.M)  # | `section.key` | its default | ...


def same_default(shown: str, default) -> bool:
    """Whether a page's default cell ("auto", "`auto`", "0 (off)", "5.0", "true") says the key's default
    (None is auto)."""
    word = shown.strip().strip("`").split(" ")[0].strip("`")
    if default is None or isinstance(default, str):
        return word == (default if default is not None else "auto")
    if isinstance(default, bool):
        return word == str(default).lower()
    try:
        return float(word) == float(default)
    except ValueError:
        return False


def wrong_defaults(text: str) -> list[str]:
    defaults = {k.key: k.default for k in config.key_help()}
    return [f"{key}: the page says {shown.strip()!r}, the default is {defaults[key]!r}"
            for key, shown in DEFAULT_ROW.findall(text) if key in defaults and not same_default(shown, defaults[key])]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_a_table_of_keys_and_defaults_says_the_real_defaults(path):
    """A page's table of config keys beside their defaults (recipe.md, gpus.md) agrees with the declarations,
    which the generated reference renders: a default changed in the code fails here until the page follows."""
    assert not wrong_defaults(path.read_text()), "\n".join(wrong_defaults(path.read_text()))


def test_a_wrong_default_in_a_page_is_found():
    page = "| `train.ema` | 0 (off) | fine |\n| `train.clip_grad_norm` | 1.0 | stale |\n| `train.lr` | `auto` | ok |\n"
    assert wrong_defaults(page) == ["train.clip_grad_norm: the page says '1.0', the default is 5.0"]


def test_the_checker_finds_what_is_wrong(tmp_path):
    """A page with a missing module, an unknown option, an unknown key, a missing script and config file, and a
    well-formed command: exactly the wrong ones are named, with their lines."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# A page",
        "```bash",
        "python -m dr_resnet.train --config configs/demo.yaml train.epochs=2 \\",
        "    --print-config                                        # fine",
        "python -m dr_resnet.no_such_command --help",
        "python -m dr_resnet.report RUNS_DIR [--out DIR] [--galery]",
        "WANDB_MODE=offline torchrun --nproc_per_node 2 -m dr_resnet.train data.sampler=balanced",
        "python bench/no_such_bench.py --fast",
        "python bench/model_speed.py --no-such-option",
        "dr-split --src A --dst B --test-fractions 0.2",
        "python -m launch.sweep --config configs/sweep.yaml --executor locl train.sampler=balanse --print-arms",
        "```",
        "```bash template",
        "python -m launch.sweep --config configs/missing.yaml --grid train.lr=0.1,0.2 data.KEY=VALUE --dry-run",
        "```",
        "```python",
        "python -m not.checked --anything",
        "```",
    ]) + "\n")
    commands = commands_of(page)
    assert [(c.where, c.marker) for c in commands] == [
        ("page.md:3", ""), ("page.md:5", ""), ("page.md:6", ""), ("page.md:7", ""), ("page.md:8", ""),
        ("page.md:9", ""), ("page.md:10", ""), ("page.md:11", ""), ("page.md:14", "template")]
    assert commands[0].words == ("python", "-m", "dr_resnet.train", "--config", "configs/demo.yaml", "train.epochs=2",
                                 "--print-config")
    assert invocations(commands[3].words) == [Invocation("dr_resnet.train", "", ("data.sampler=balanced",),
                                                         (("WANDB_MODE", "offline"),), "torchrun",
                                                         ("--nproc_per_node", "2"))]
    assert [problems(c) for c in commands] == [
        [],
        ["python -m dr_resnet.no_such_command: no such module"],
        ["python -m dr_resnet.report: no option --galery"],
        ["data.sampler: no such config key"],
        ["bench/no_such_bench.py: no such script"],
        ["bench/model_speed.py: no option --no-such-option"],
        ["python -m dr_resnet.split: no option --test-fractions"],
        [f"train.sampler=balanse: not one of {', '.join(CHOICES['train.sampler'])}",
         "python -m launch.sweep --executor locl: not one of "
         + ", ".join(choices_of(module_parser("launch.sweep"))["--executor"])],
        ["python -m launch.sweep --config configs/missing.yaml: no such file"],
    ]
    assert [call.module for c in commands for call in runnable(c)] == ["dr_resnet.train", "dr_resnet.no_such_command",
                                                                       "launch.sweep"]


def test_the_link_checker_finds_what_is_wrong(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its part: one\n")
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n[fine](other.md), [fine too](other.md#its-part-one), [here](#a-page), "
                    "[web](https://example.org/x), [gone](missing.md), [no part](other.md#nowhere), [nor](#nothing)\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no such heading",
                                  "#nothing: no such heading"]
