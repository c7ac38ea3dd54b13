"""The documentation cannot drift from the command line.

- Every command line in README.md and docs/*.md (fenced code blocks, and inline code spans that start with a
  command) that runs one of this project's console scripts or one of nnU-Net's ``nnUNetv2_*`` commands uses
  only options that command's ``-h`` lists. Deprecated spellings are hidden from ``-h`` (argparse.SUPPRESS),
  so a page that still uses one fails here.
- Every relative link (and ``#anchor``) in README.md and docs/ points to an existing file (and heading).
- Every page of docs/ is reachable from README.md.
- README.md stays a landing page: at most 150 lines, and it keeps the two commands, the test command being
  exactly what the CI script ``.ci/run`` runs.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))

INSTALL_AND_DEMO = 'pip install "torch==2.14.1" "torchvision==0.29.1" && pip install -e ".[test]" && diffaug_demo'
TEST_COMMAND = "python -m pytest -q tests"
MAX_README_LINES = 150

# nnU-Net's own commands that the docs may show; each is checked against its own -h
NNUNET_COMMANDS = ("nnUNetv2_train", "nnUNetv2_plan_and_preprocess", "nnUNetv2_predict",
                   "nnUNetv2_find_best_configuration", "nnUNetv2_evaluate_folder", "nnUNetv2_extract_fingerprint",
                   "nnUNetv2_plan_experiment", "nnUNetv2_preprocess")

FENCE = re.compile(r"^(\s*)(```+|~~~+)(.*)$")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
INLINE_CODE_MULTILINE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\s*\n))+)`(?!`)")   # not across a blank line
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*$")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def project_scripts() -> dict[str, str]:
    """console script name -> 'module:function', from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
        return tomllib.loads(text)["project"]["scripts"]
    except ModuleNotFoundError:   # Python 3.10: the table is simple enough to read by hand
        table = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S).group(1)
        return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', table, re.M))


SCRIPTS = project_scripts()
COMMANDS = set(SCRIPTS) | set(NNUNET_COMMANDS)


# ------------------------------------------------------------------------------------------ command lines

def code_blocks(text: str):
    """(first line number, lines) of every fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start, body = m.group(2), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            body.append(lines[i])
            i += 1
        yield start + 1, body
        i += 1


def logical_lines(lines):
    """Backslash-continued lines joined: (offset of the first, joined text)."""
    current, first = "", None
    for k, line in enumerate(lines):
        if first is None:
            first = k
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        yield first, current + line
        current, first = "", None
    if current:
        yield first, current


def invocations(text: str):
    """(command, option tokens) of every command in one shell line that runs a known command."""
    text = re.sub(r"\$\(\s*(?:which\s+)?([\w.-]+)\s*\)", r"\1", text)   # torchrun $(which diffaug_x) ...; eval "$(x)"
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:   # an unbalanced quote: not a shell line
        return
    segment: list[str] = []
    for token in tokens + [";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        found = _invocation(segment)
        if found:
            yield found
        segment = []


def _invocation(segment: list[str]):
    for k, token in enumerate(segment):
        name = os.path.basename(token)
        if name in COMMANDS:
            options = []
            for arg in segment[k + 1:]:
                if "$" in arg or "<" in arg:   # $VAR, $(...) or a <placeholder> value
                    continue
                arg = arg.split("=", 1)[0] if arg.startswith("--") else arg
                if OPTION.match(arg):
                    options.append(arg)
            return name, options
    first = next((t for t in segment if not re.match(r"^[A-Za-z_]\w*=", t)), "")
    if re.fullmatch(r"diffaug_[a-z_]+", first) and not re.search(r"_r\d", first):
        return first, []   # opens a line like a command but is no console script: reported as unknown
    return None


def documented_invocations():
    """(page, line number, command, options, the line) for every command the docs show."""
    found = []
    for page in PAGES:
        text = page.read_text()
        rel = page.relative_to(ROOT)
        in_blocks = set()
        for start, body in code_blocks(text):
            in_blocks.update(range(start - 1, start + len(body) + 1))
            for offset, line in logical_lines(body):
                for command, options in invocations(line):
                    found.append((rel, start + offset, command, options, line.strip()))
        # inline code spans, which may run over a line break inside a paragraph (or a quote's "> ")
        prose = [("" if n in in_blocks else re.sub(r"^\s*>\s?", "", line))
                 for n, line in enumerate(text.splitlines(), start=1)]
        joined = "\n".join(prose)
        for m in INLINE_CODE_MULTILINE.finditer(joined):
            span = " ".join(m.group(1).split())
            first = span.split()[0] if span else ""
            if os.path.basename(first) in COMMANDS:
                n = joined.count("\n", 0, m.start()) + 1
                for command, options in invocations(span):
                    found.append((rel, n, command, options, span))
    return found


# ------------------------------------------------------------------------------------------ -h outputs

def _help_argv(command: str) -> list[str]:
    if command in SCRIPTS:
        module, function = SCRIPTS[command].split(":")
        exe = shutil.which(command)
        if exe:
            return [exe, "-h"]
        return [sys.executable, "-c", f"import sys; sys.argv[0] = {command!r}; "
                f"from {module} import {function}; {function}()", "-h"]
    exe = shutil.which(command)
    if exe is None:
        pytest.skip(f"{command} is not installed")
    return [exe, "-h"]


def help_options(help_text: str) -> set[str]:
    """Option strings argparse lists: those in the usage block and those that open an option line (two spaces
    of indent, the declaration up to the first gap of two spaces). Words in descriptions do not count."""
    options = set()
    lines = help_text.splitlines()
    usage_end = next((k for k, line in enumerate(lines) if not line.strip()), len(lines))
    for line in lines[:usage_end]:
        options.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line))
    for line in lines[usage_end:]:
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            options.update(re.findall(r"(?:^|, )(--?[A-Za-z][\w-]*)", m.group(1)))
    return options


@lru_cache(maxsize=None)
def command_help(command: str) -> str:
    env = dict(os.environ, COLUMNS="120", NO_COLOR="1", PYTHON_COLORS="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(_help_argv(command), capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"{command} -h failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


INVOCATIONS = documented_invocations()


def test_docs_show_commands():
    """The parser above finds the commands the docs show (a guard against it silently finding none)."""
    commands = {c for _, _, c, _, _ in INVOCATIONS}
    for needed in ("diffaug_demo", "diffaug_train_synthesizer", "diffaug_synthesize", "diffaug_benchmark",
                   "diffaug_evaluate", "nnUNetv2_train", "nnUNetv2_plan_and_preprocess"):
        assert needed in commands, f"no documented command line runs {needed}"


def test_documented_options_exist():
    used = sorted({c for _, _, c, _, _ in INVOCATIONS if c in COMMANDS})
    unknown_commands = [f"{p}:{n}: {c} (in: {line})" for p, n, c, _, line in INVOCATIONS if c not in COMMANDS]
    assert not unknown_commands, "commands that do not exist:\n" + "\n".join(unknown_commands)
    with ThreadPoolExecutor(max_workers=4) as pool:   # nnU-Net's -h imports torch: a few seconds each
        helps = dict(zip(used, pool.map(command_help, used)))
    known = {c: help_options(h) | {"-h", "--help"} for c, h in helps.items()}
    problems = []
    for page, n, command, options, line in INVOCATIONS:
        for option in options:
            if option not in known[command]:
                problems.append(f"{page}:{n}: {command} has no option {option} in its -h (in: {line})")
    assert not problems, "documented options missing from -h (or deprecated, hence hidden):\n" + "\n".join(problems)


def test_help_parser_reads_argparse():
    """help_options reads what argparse declares, not what descriptions mention."""
    import argparse
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("-p", "-plans", help="plans; older spelling of --gone")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, help="see --also-gone")
    parser.add_argument("--hidden", help=argparse.SUPPRESS)
    text = parser.format_help()
    assert help_options(text) == {"-h", "--help", "-p", "-plans", "--calibrate", "--no-calibrate"}


def test_invocation_parsing():
    line = 'A=1 torchrun --standalone $(which diffaug_train_synthesizer) -d 4 --preset=x.json # -no'
    assert list(invocations(line)) == [("diffaug_train_synthesizer", ["-d", "--preset"])]
    assert list(invocations(INSTALL_AND_DEMO)) == [("diffaug_demo", [])]
    assert list(invocations("nnUNetv2_train $D 2d 0 -tr <trainer> -p -1")) == [("nnUNetv2_train", ["-tr", "-p"])]


# ------------------------------------------------------------------------------------------ links and pages

def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text()
    in_code, anchors = False, set()
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and re.match(r"^#{1,6} ", line):
            anchors.add(_anchor(line.lstrip("#")))
    return anchors


def _links(page: Path):
    in_code = False
    for n, line in enumerate(page.read_text().splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            yield n, target


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        for n, target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                problems.append(f"{where}: no heading with anchor #{fragment}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_reachable_from_readme():
    seen, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in seen or not page.is_file() or page.suffix != ".md":
            continue
        seen.add(page)
        for _, target in _links(page):
            path = target.partition("#")[0]
            if path and not re.match(r"^[a-z][a-z0-9+.-]*:", path):
                todo.append((page.parent / path).resolve())
    missing = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in seen]
    assert not missing, f"docs pages no link from README.md leads to: {missing}"


def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    assert INSTALL_AND_DEMO in lines, "README.md lost the install + demo command"
    assert TEST_COMMAND in lines, "README.md lost the test command"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in [line.strip() for line in ci], ".ci/run no longer runs README.md's test command"
