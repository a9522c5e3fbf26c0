"""The README and docs/*.md, checked against the code.

Every fenced ``bash`` / ``sh`` / ``console`` / ``python`` block of README.md and docs/*.md is
either run or skipped with a reason. An HTML comment on the line before a block says which
(docs/testing.md lists them): none - run it; ``<!-- doc-test: skip (REASON) -->`` - not run;
``<!-- doc-test: gpu (REASON) -->`` - run by tests/gpu/test_docs_gpu.py on a GPU;
``<!-- doc-test: write FILE -->`` - the block (any language) is written to FILE for the blocks
after it; ``<!-- doc-test: checkout (REASON) -->`` - run in a scratch copy of the checkout;
``<!-- doc-test: needs TOOL -->`` - run where TOOL is on the PATH.

Fast tier: the blocks parse, every skip has a reason, every ``fa4aot`` subcommand and flag a block
or an inline code span names exists in ``fa4aot --help`` / ``fa4aot <command> --help``, every
command is in docs/cli.md, the README is short and its links (and the docs' links) resolve, and
the skipped blocks are listed as skipped tests with their reasons. Full tier (``slow``: running
them takes about two minutes): each page's runnable blocks, in order, in a scratch directory
holding a copy of ``manifests/`` and of the ci.yaml cache as ``./cache``; and the variant counts
the pages quote.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import pytest
from helpers import CI_MANIFEST, FAST_MANIFEST, needs_dsl

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))
#: fenced-block languages that hold commands or code
CODE_LANGS = ("bash", "sh", "console", "python")
KINDS = ("run", "skip", "gpu", "write", "checkout", "needs")
#: the README's two newcomer commands, byte for byte (CI runs the second verbatim: .ci/run)
NEWCOMER_BUILD = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[build]' && fa4aot build manifests/ci.yaml"
)
NEWCOMER_TESTS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[build,dev]' && python -m pytest -q"
)
README_MAX_LINES = 250


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # the opening fence's line, 1-based
    lang: str
    text: str
    kind: str  # one of KINDS
    arg: str  # the reason, the file to write, or the tool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(?P<kind>[a-z-]+)\s*(?P<arg>.*?)\s*-->$")
_REASON = re.compile(r"^\((?P<reason>.*\S.*)\)$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_SPAN = re.compile(r"(?<!`)`(?P<code>[^`]+)`(?!`)")
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _directive_arg(kind: str, raw: str) -> tuple[str, str | None]:
    """(the argument, a problem or None) of a directive."""
    if kind in ("skip", "gpu", "checkout"):
        m = _REASON.match(raw)
        return (m["reason"].strip(), None) if m else ("", f"'{kind}' needs a reason in parentheses, got {raw!r}")
    if kind == "write":
        bad = not raw or raw.startswith("/") or ".." in Path(raw).parts
        return raw, (f"'write' needs a relative file name, got {raw!r}" if bad else None)
    if kind == "needs":
        return raw, (None if re.fullmatch(r"[\w.+-]+", raw or "") else f"'needs' takes one program name, got {raw!r}")
    return raw, f"unknown doc-test directive {kind!r} (known: {', '.join(KINDS[1:])})"


def parse_page(page: Path) -> tuple[list[Block], list[str]]:
    """The page's blocks (code blocks, and any block a directive names) and the problems found."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    where = page.relative_to(ROOT)
    pending: tuple[int, str, str] | None = None  # (line, kind, raw arg) of the last directive
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        m = _FENCE.match(line)
        if m:
            fence, lang = m["fence"], m["lang"].lower()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
            if end is None:
                problems.append(f"{where}:{i + 1}: unclosed code fence")
                break
            text = "\n".join(lines[i + 1 : end]) + "\n"
            if pending is not None:
                kind, (arg, problem) = pending[1], _directive_arg(pending[1], pending[2])
                if problem:
                    problems.append(f"{where}:{pending[0]}: {problem}")
                elif lang not in CODE_LANGS and kind != "write":
                    problems.append(f"{where}:{pending[0]}: '{kind}' on a {lang or 'plain'} block")
                blocks.append(Block(page, i + 1, lang, text, kind, arg))
            elif lang in CODE_LANGS:
                blocks.append(Block(page, i + 1, lang, text, "run", ""))
            pending = None
            i = end + 1
            continue
        d = _DIRECTIVE.match(line)
        if d:
            if pending is not None:
                problems.append(f"{where}:{pending[0]}: a doc-test directive not followed by a code block")
            pending = (i + 1, d["kind"], d["arg"])
        elif line.startswith("<!--") and "doc-test" in line:
            problems.append(f"{where}:{i + 1}: malformed doc-test directive {line!r}")
        elif line and pending is not None:
            problems.append(f"{where}:{pending[0]}: a doc-test directive must come right before its code block")
            pending = None
        i += 1
    if pending is not None:
        problems.append(f"{where}:{pending[0]}: a doc-test directive at the end of the page")
    return blocks, problems


@lru_cache(maxsize=1)
def parsed() -> tuple[tuple[Block, ...], tuple[str, ...]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for page in PAGES:
        b, p = parse_page(page)
        blocks += b
        problems += p
    return tuple(blocks), tuple(problems)


def gpu_blocks() -> list[Block]:
    """The blocks marked ``gpu`` (tests/gpu/test_docs_gpu.py runs the python ones)."""
    return [b for b in parsed()[0] if b.kind == "gpu"]


def _not_run(b: Block) -> str | None:
    """Why a block is not run on this machine (None: it is run)."""
    if b.kind in ("skip", "gpu"):
        return f"{b.kind}: {b.arg}"
    if b.kind == "needs" and shutil.which(b.arg) is None:
        return f"needs {b.arg}, which is not on the PATH"
    return None


def _script(b: Block) -> str:
    """The shell text of a bash / sh / console block (a console block: its ``$`` lines)."""
    if b.lang != "console":
        return b.text
    return "\n".join(line[2:] for line in b.text.splitlines() if line.startswith("$ ")) + "\n"


# -- fa4aot commands named in the docs --------------------------------------------------------------


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell script, as word lists (continuations joined, comments,
    redirections and ``&&`` / ``|`` / ``;`` / parentheses split off)."""
    commands: list[list[str]] = [[]]
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        for word in lex:
            if word and set(word) <= set("();<>|&"):
                commands.append([])
            else:
                commands[-1].append(word)
        commands.append([])
    return [c for c in commands if c]


def fa4aot_args(words: list[str]) -> list[str] | None:
    """The command-line arguments of an ``fa4aot`` / ``python -m fa4aot`` command (None: another
    program)."""
    while words and _ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words[:1] == ["fa4aot"]:
        return words[1:]
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1:3] == ["-m", "fa4aot"]:
        return words[3:]
    return None


def _span_args(code: str) -> list[str] | None:
    """The arguments an inline code span such as ``fa4aot build MANIFEST [-j N]`` names."""
    words = code.replace("\\|", "|").replace("[", " ").replace("]", " ").split()
    return words[1:] if words[:1] == ["fa4aot"] and len(words) > 1 else None


def inline_spans(page: Path) -> list[tuple[int, str]]:
    """(line, code) of every inline code span outside fenced blocks (spans may wrap a line)."""
    out: list[tuple[int, str]] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    para: list[tuple[int, str]] = []
    fence = None

    def flush() -> None:
        if not para:
            return
        text = "\n".join(t for _, t in para)
        for m in _SPAN.finditer(text):
            out.append((para[0][0] + text.count("\n", 0, m.start()), m["code"].replace("\n", " ")))
        para.clear()

    for n, line in enumerate(lines, 1):
        m = _FENCE.match(line.strip())
        if fence:
            fence = None if line.strip() == fence else fence
            continue
        if m:
            flush()
            fence = m["fence"]
        elif not line.strip():
            flush()
        else:
            para.append((n, line))
    flush()
    return out


@cache
def cli_help(*path: str) -> str:
    """``fa4aot <path> --help``, run in this process (click's CliRunner)."""
    from click.testing import CliRunner

    from fa4aot.tools.cli import main

    result = CliRunner().invoke(main, [*path, "--help"], prog_name="fa4aot")
    assert result.exit_code == 0, f"fa4aot {' '.join(path)} --help: {result.output}"
    return result.output


def _listed(help_text: str, name: str) -> bool:
    """Whether a group's --help lists the command ``name``."""
    return re.search(rf"^\s+{re.escape(name)}(\s|$)", help_text.split("Commands:", 1)[-1], re.M) is not None


def _has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def check_fa4aot_args(args: list[str], *, loose: bool = False) -> list[str]:
    """What in ``args`` the CLI does not know: a command, a subcommand or a flag. ``loose``: an
    inline span, where a word in capitals or ``<...>`` stands for a value."""
    problems: list[str] = []
    path: list[str] = []
    words = list(args)
    # global options, then the command (and a group's subcommand)
    while words and words[0].startswith("-") and words[0] != "--":
        flag = words.pop(0).split("=")[0]
        if not (_has_flag(cli_help(), flag) or re.fullmatch(r"-[vq]+", flag)):
            problems.append(f"fa4aot has no option {flag}")
    for _ in range(2):
        if not words or words[0].startswith("-"):
            break
        group_help = cli_help(*path)
        if "Commands:" not in group_help:
            break  # a command's argument (MANIFEST, a file), not a subcommand
        name = words[0]
        names = name.split("|")
        if not all(re.fullmatch(r"[a-z][a-z0-9-]*", n) for n in names):
            if loose:
                return problems  # a placeholder such as <command>: nothing more to check
            problems.append(f"'{name}' is not an fa4aot command")
            return problems
        missing = [n for n in names if not _listed(group_help, n)]
        if missing:
            problems.append(f"fa4aot {' '.join(path)} has no command {', '.join(missing)}".replace("  ", " "))
            return problems
        words.pop(0)
        if len(names) > 1:
            return problems  # add|list|remove: each exists; their options are not spelled out
        path.append(name)
    if not path:
        return problems
    help_text = cli_help(*path)
    for word in words:
        if word == "--":
            break  # record's workload command follows
        if word.startswith("-") and len(word) > 1:
            flag = word.split("=")[0]
            if not _has_flag(help_text, flag):
                problems.append(f"fa4aot {' '.join(path)} has no option {flag}")
    return problems


# -- fast tier --------------------------------------------------------------------------------------


def test_every_directive_is_well_formed_and_every_skip_has_a_reason():
    blocks, problems = parsed()
    assert not problems, "\n".join(problems)
    assert blocks, "no code blocks found"
    for b in blocks:
        assert b.kind in KINDS, b.where
        if b.kind in ("skip", "gpu", "checkout"):
            assert len(b.arg) >= 10, f"{b.where}: give a real reason, not {b.arg!r}"


def test_every_shell_block_parses_and_names_only_commands_and_flags_the_cli_has():
    problems = []
    checked = 0
    for b in parsed()[0]:
        if b.lang not in ("bash", "sh", "console"):
            continue
        try:
            commands = shell_commands(_script(b))
        except ValueError as e:
            problems.append(f"{b.where}: does not parse as shell: {e}")
            continue
        for words in commands:
            args = fa4aot_args(words)
            if args is not None:
                checked += 1
                problems += [f"{b.where}: {p} ({' '.join(words)})" for p in check_fa4aot_args(args)]
    assert not problems, "\n".join(problems)
    assert checked > 40, checked


def test_every_python_block_compiles():
    for b in parsed()[0]:
        if b.lang == "python" and not b.text.lstrip().startswith(">>>"):
            compile(b.text, b.where, "exec")


def test_every_fa4aot_command_an_inline_span_names_exists():
    problems = []
    for page in PAGES:
        for line, code in inline_spans(page):
            args = _span_args(code)
            if args is not None:
                problems += [
                    f"{page.relative_to(ROOT)}:{line}: {p} (`{code}`)" for p in check_fa4aot_args(args, loose=True)
                ]
    assert not problems, "\n".join(problems)


def test_the_command_reference_lists_every_command():
    from fa4aot.tools.cli import main

    cli_md = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in main.commands if f"`fa4aot {name}" not in cli_md]
    assert not missing, f"docs/cli.md does not list: {missing}"


def test_no_runnable_block_changes_the_environment_or_the_repository():
    """Runnable blocks run in a scratch directory with the test environment's fa4aot: they must not
    install packages, touch git or the system."""
    forbidden = re.compile(r"(^|[\s;&|(])(pip install|git |apt-get|sudo|rm -rf /)")
    for b in parsed()[0]:
        if b.kind in ("run", "checkout", "needs") and b.lang != "python":
            assert not forbidden.search(_script(b)), f"{b.where} runs: {forbidden.search(_script(b))[0]!r}"


def test_the_readme_is_short_and_keeps_the_newcomer_commands_verbatim():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}: move detail to docs/)"
    blocks = [b.text.strip() for b in parsed()[0] if b.page == README and b.lang == "bash"]
    assert NEWCOMER_BUILD in blocks and NEWCOMER_TESTS in blocks
    assert NEWCOMER_TESTS in (ROOT / ".ci" / "run").read_text(encoding="utf-8"), ".ci/run runs the README's command"


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in page.read_text(encoding="utf-8").splitlines():
        m = _FENCE.match(line.strip())
        if fence:
            fence = None if line.strip() == fence else fence
            continue
        if m:
            fence = m["fence"]
        elif line.startswith("#"):
            slug = github_anchor(line.lstrip("#"))
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            out.add(slug if k == 0 else f"{slug}-{k}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    """Links to files and folders exist (the README's go to docs/ pages, LICENSE, NOTICE and
    results), and a link's #anchor is a heading of its page."""
    problems = []
    for line_no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for m in _LINK.finditer(line):
            target = m["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{line_no}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{line_no}: {target}: no heading #{anchor} in {dest.name}")
            elif dest.exists() and ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{line_no}: {target}: outside the repository")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_readme_links_only_to_pages_that_exist():
    docs = {m["target"].partition("#")[0] for m in _LINK.finditer(README.read_text(encoding="utf-8"))}
    docs = {d for d in docs if d.startswith("docs/")}
    assert docs and all((ROOT / d).is_file() for d in docs), sorted(d for d in docs if not (ROOT / d).is_file())
    linked = {Path(d).name for d in docs}
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md")}, "every docs/ page is linked from the README"


def _quoted_count(pattern: str, text: str, what: str) -> int:
    m = re.search(pattern, text)
    assert m, f"the count of {what} is no longer quoted where this test looks"
    return int(m[1])


@needs_dsl
def test_the_variant_counts_the_readme_and_testing_page_quote():
    from fa4aot.compile import manifest

    readme = README.read_text(encoding="utf-8")
    testing = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    ci = len(manifest.load(CI_MANIFEST).variants)
    assert _quoted_count(r"`manifests/ci\.yaml` - (\d+) kernels", readme, "ci.yaml kernels") == ci
    assert _quoted_count(r"\((\d+) entries: at least one", testing, "fast.yaml entries") == len(
        manifest.load(FAST_MANIFEST).variants
    )


_BLOCKS = parsed()[0]
_SKIPPED = [b for b in _BLOCKS if b.kind in ("skip", "gpu")]


@pytest.mark.parametrize("block", _SKIPPED, ids=[b.where for b in _SKIPPED])
def test_skipped_block(block):
    """One skipped test per block the docs mark skip or gpu, with its reason (pytest -rs lists them)."""
    pytest.skip(f"{block.where}: {block.kind}: {block.arg}")


# -- full tier: run the blocks ----------------------------------------------------------------------

_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "cache", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    ".devcarry", ".device", ".whl",
)  # fmt: skip


def _environ(home: Path) -> dict[str, str]:
    """The commands' environment: this interpreter's fa4aot first on the PATH, no FA4AOT_*
    variable of the caller's, no user-wide trusted keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FA4AOT_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], b: Block) -> None:
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the block left running in the background
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{b.where} exited {proc.returncode}:\n{b.text}\n--- output ---\n{out[-6000:]}"


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.page == p and b.kind != "write" and not _not_run(b) for b in _BLOCKS)]


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable_pages(), ids=[str(p.relative_to(ROOT)) for p in _runnable_pages()])
def test_the_page_s_commands_run(page, ci_cache, tmp_path):
    """Every runnable block of the page, in order, in a scratch directory: ./manifests (a copy),
    ./tests and ./benchmarks (links), ./cache (a copy of the ci.yaml cache)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "manifests", work / "manifests")
    for name in ("tests", "benchmarks", "examples"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    shutil.copytree(ci_cache, work / "cache")
    env = _environ(tmp_path)
    for b in (b for b in _BLOCKS if b.page == page):
        if b.kind == "write":
            (work / b.arg).parent.mkdir(parents=True, exist_ok=True)
            (work / b.arg).write_text(b.text, encoding="utf-8")
        elif _not_run(b):
            continue
        elif b.lang == "python":
            _run([sys.executable, "-c", b.text], work, env, b)
        elif b.kind == "checkout":
            checkout = tmp_path / "checkout"
            if not checkout.exists():
                shutil.copytree(ROOT, checkout, ignore=_COPY_IGNORE, symlinks=True)
            _run(["bash", "-e", "-o", "pipefail", "-c", _script(b)], checkout, env, b)
        else:
            _run(["bash", "-e", "-o", "pipefail", "-c", _script(b)], work, env, b)


@pytest.mark.slow
@needs_dsl
def test_the_shipped_manifest_table_quotes_each_manifest_s_variant_count():
    from fa4aot.compile import manifest

    table = (ROOT / "docs" / "manifests.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (`manifests/[^|]+) \| ([\d, ]+) \|", table, re.M)
    assert rows, "docs/manifests.md has no table of shipped manifests"
    quoted = {}
    for names, counts in rows:
        for name, count in zip(re.findall(r"`(manifests/[^`]+)`", names), counts.split(","), strict=True):
            quoted[name] = int(count)
    shipped = {f"manifests/{p.name}" for p in (ROOT / "manifests").glob("*.yaml")}
    assert set(quoted) == shipped, f"listed {sorted(quoted)}, shipped {sorted(shipped)}"
    actual = {name: len(manifest.load(ROOT / name).variants) for name in quoted}
    assert quoted == actual
