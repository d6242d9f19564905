"""The README and docs/ stay true to the code.

- every relative link resolves to a file or folder of the repository, and every anchor (``#...``) to
  a heading of the target page, by GitHub's slug rules;
- every ``cbam-deploy ...`` command the pages show (in code blocks, in inline code, and after a
  ``docker run ... cbam-deploy:TAG`` whose entrypoint is the CLI) parses against the real CLI: the
  click command built from ``cbam_deploy.cli.app`` makes its context with resilient parsing off, so an
  unknown command or option, a missing required option or argument, a value of the wrong type or an
  extra argument fails. Nothing is run;
- every test the pages name as ``tests/test_x.py::test_y`` exists (read with ast), and every
  parameter id named after it in brackets (``[export-*]``) matches a string in that test file.

Placeholders the pages use consistently (``BUNDLE``, ``NAME``, ``DIR``, ``bundles/NAME``, ``<yy.mm>``)
are plain strings to the parser; the numeric ones (``N``, ``S``) stand for a number. ``[...]`` marks
optional parts (parsed as given), ``a|b`` alternatives (each parsed), ``...`` "more of the same"
(dropped). In running text, a bare ``cbam-deploy`` names the program and a bare ``cbam-deploy
COMMAND`` names a command: only the command's existence is checked.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import itertools
import re
import shlex
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NUMERIC_PLACEHOLDERS = {"N": "1", "S": "1"}
FENCE = re.compile(r"^(\s*)(```|~~~)(.*)$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """(lines outside fenced code blocks, with those inside blanked; the fenced blocks' lines)."""
    prose, blocks, block, fence = [], [], None, None
    for line in text.splitlines():
        match = FENCE.match(line)
        if block is None and match:
            block, fence = [], match.group(2)
            prose.append("")
        elif block is not None and match and match.group(2) == fence and not match.group(3).strip():
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert block is None, "a code block is not closed"
    return prose, blocks


def _without_code_spans(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: "x" * len(m.group(2)), line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, without punctuation other than
    '-' and '_', spaces turned into '-'."""
    text = re.sub(r"(`+)(.+?)\1", r"\2", heading)               # inline code: its text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)         # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                            # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    prose, _ = split_fences(path.read_text())
    found = []
    for line in prose:
        # code spans are blanked first: what looks like a link inside one is not a link
        for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _without_code_spans(line)):
            found.append(match.group(1))
    return found


def test_the_pages_exist_and_the_readme_links_every_docs_page():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1
    linked = {(ROOT / target.split("#")[0]).resolve() for target in links(ROOT / "README.md") if not _external(target)}
    missing = [_rel(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320


def _external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    targets = links(page)
    for target in targets:
        if _external(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
            continue
        if ROOT not in destination.parents and destination != ROOT:
            broken.append(f"{target}: outside the repository")
            continue
        if anchor:
            if destination.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(destination):
                broken.append(f"{target}: no heading with that anchor in {_rel(destination)}")
    assert not broken, f"{_rel(page)}: " + "; ".join(broken)


# ---------------------------------------------------------------- commands


def _logical_lines(block: list[str]) -> list[str]:
    lines, current = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            lines.append(current + line)
            current = ""
    if current:
        lines.append(current)
    return lines


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text.replace("\\|", "|"), posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _cli_invocations(tokens: list[str]) -> list[list[str]]:
    """The CLI arguments of every cbam-deploy invocation in one shell line (chains split on && ; ||)."""
    found, part = [], []
    for token in [*tokens, "&&"]:
        if token in ("&&", "||", ";", "|"):
            if part:
                if part[0] == "$":
                    part = part[1:]
                if part and (part[0] == "cbam-deploy" or part[0].endswith("/cbam-deploy")):
                    found.append(part[1:])
                elif part[:2] == ["docker", "run"] and "--entrypoint" not in part:
                    image = next((i for i, t in enumerate(part) if t.startswith("cbam-deploy:")), None)
                    if image is not None:
                        found.append(part[image + 1:])
            part = []
        else:
            part.append(token)
    return found


def shown_commands() -> list[tuple[str, str, list[str], bool]]:
    """(page, the text shown, the CLI arguments, whether it is a bare command name in running text)."""
    shown = []
    for page in PAGES:
        prose, blocks = split_fences(page.read_text())
        for block in blocks:
            for line in _logical_lines(block):
                if "cbam-deploy" not in line:
                    continue
                for args in _cli_invocations(_tokens(line)):
                    shown.append((_rel(page), line.strip(), args, False))
        for line in prose:
            for match in re.finditer(r"`((?:\$ )?cbam-deploy(?: [^`]*)?|docker run [^`]*)`", line):
                for args in _cli_invocations(_tokens(match.group(1))):
                    shown.append((_rel(page), match.group(1), args, len(args) <= 1))
    return shown


def _variants(args: list[str]) -> list[list[str]]:
    """Brackets (optional parts) removed, '...' dropped, numeric placeholders filled in, and one
    argument list per combination of 'a|b' alternatives."""
    choices = []
    for token in args:
        token = token.lstrip("[").rstrip("]")
        if token in ("", "...", "…"):
            continue
        options = [t for t in token.split("|")] if "|" in token and not token.startswith("|") else [token]
        choices.append([NUMERIC_PLACEHOLDERS.get(t, t) for t in options])
    return [list(combo) for combo in itertools.islice(itertools.product(*choices), 64)]


@functools.lru_cache(maxsize=1)
def _cli():
    """The click command the ``cbam-deploy`` entry point runs, built from the Typer app."""
    import typer.main

    from cbam_deploy.cli import app

    return typer.main.get_command(app)


def _parse(args: list[str]) -> None:
    """Parse ``cbam-deploy ARGS`` as the CLI would, without running anything."""
    group = _cli()
    assert args, "no command"
    name, rest = args[0], args[1:]
    ctx = group.make_context("cbam-deploy", [name], resilient_parsing=False)
    command = group.get_command(ctx, name)
    if command is None:
        ctx.fail(f"No such command {name!r}; the commands are {', '.join(sorted(group.commands))}")
    assert not {"--help", "-h"} & set(rest), "a command shown with --help is not checked"
    with ctx:
        command.make_context(name, list(rest), parent=ctx, resilient_parsing=False)


COMMANDS = shown_commands()


def test_the_pages_show_commands_for_every_cli_command():
    shown = {args[0] for _, _, args, bare in COMMANDS if args and not bare}
    missing = sorted(set(_cli().commands) - shown)
    assert not missing, f"no page shows these commands: {missing}"


@pytest.mark.parametrize("page,text,args,bare", COMMANDS, ids=[f"{p}:{' '.join(a)[:60]}" for p, _, a, _ in COMMANDS])
def test_every_command_shown_parses_against_the_cli(page, text, args, bare):
    group = _cli()
    if bare:
        assert not args or args[0] in group.commands, f"{page}: `{text}` names no command"
        return
    for variant in _variants(args):
        try:
            _parse(variant)
        except Exception as exc:  # click's usage errors; format_message gives click's own words
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            pytest.fail(f"{page}: `{text}` does not parse as cbam-deploy {' '.join(variant)}: {message}")


def test_the_command_check_fails_on_what_the_cli_refuses():
    """The checker itself: each of these is refused, so a wrong command in the docs cannot pass."""
    for bad in (["exprot", "--model", "x"], ["export"], ["export", "--model", "x", "--bogus"],
                ["export", "--model", "x", "--num-classes", "many"], ["info"], ["info", "a", "b"],
                ["kserve", "BUNDLE", "-o", "x.yaml"]):
        with pytest.raises(Exception) as caught:
            _parse(bad)
        assert hasattr(caught.value, "format_message"), f"{bad}: {caught.value!r} is not a usage error"
    _parse(["export", "--model", "resnet50_cbam", "--num-classes", "10"])
    assert _variants(["[--stem", "imagenet|cifar]", "BUNDLE", "...", "--dla-core", "N"]) == [
        ["--stem", "imagenet", "BUNDLE", "--dla-core", "1"], ["--stem", "cifar", "BUNDLE", "--dla-core", "1"]]
    assert _cli_invocations(_tokens("docker run --rm -v $PWD:/work cbam-deploy:cpu serve B --host 0.0.0.0  # note")) == [
        ["serve", "B", "--host", "0.0.0.0"]]
    assert _cli_invocations(_tokens("docker run --entrypoint python cbam-deploy:cuda scripts/gpu_check.py")) == []


# ---------------------------------------------------------------- tests named by the pages

TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)((?:\[[^\]]*\])?)((?:`?,\s*`\[[^\]]*\])*)")


def named_tests() -> list[tuple[str, str, str, list[str]]]:
    """(page, test file, test name, parameter id patterns) for every ``tests/x.py::name`` a page names."""
    named = []
    for page in PAGES:
        for match in TEST_REFERENCE.finditer(page.read_text()):
            ids = re.findall(r"\[([^\]]*)\]", match.group(3) + match.group(4))
            named.append((_rel(page), match.group(1), match.group(2), [i.strip() for part in ids for i in part.split(",")]))
    return named


NAMED = named_tests()


def test_the_reliability_matrix_names_its_tests():
    matrix = [n for n in NAMED if n[0] == "docs/reliability.md"]
    assert len(matrix) >= 40, f"the bad-input matrix names only {len(matrix)} tests"


def _definitions(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return functions, strings


@pytest.mark.parametrize("page,test_file,name,ids", NAMED, ids=[f"{p}:{n}{i}" for p, _, n, i in NAMED])
def test_every_named_test_exists(page, test_file, name, ids):
    path = ROOT / test_file
    assert path.is_file(), f"{page} names {test_file}, which does not exist"
    functions, strings = _definitions(path)
    assert name in functions and name.startswith("test"), f"{page} names {test_file}::{name}, which is not there"
    for pattern in ids:
        assert any(fnmatch.fnmatchcase(s, pattern) for s in strings), \
            f"{page} names {test_file}::{name}[{pattern}]: no parameter id in {test_file} matches it"


# --- the Python shown -------------------------------------------------------------------------------

def _python_blocks(page: Path) -> list[str]:
    text = page.read_text()
    blocks, block, fence = [], None, None
    for line in text.splitlines():
        match = FENCE.match(line)
        if block is None and match and match.group(3).strip() == "python":
            block, fence = [], match.group(2)
        elif block is not None and match and match.group(2) == fence:
            blocks.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def python_calls(source: str) -> dict[str, set[str]]:
    """{"cbam_deploy": names used as cbam_deploy.X, "bundle": methods called on a name bound to
    cbam_deploy.export(...) or cbam_deploy.Bundle(...)} in a Python snippet."""
    tree = ast.parse(textwrap.dedent(source))
    used = {"cbam_deploy": set(), "bundle": set()}
    bundles = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name) and \
                node.value.func.value.id == "cbam_deploy" and node.value.func.attr in ("export", "Bundle"):
            bundles.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "cbam_deploy":
                used["cbam_deploy"].add(node.attr)
            elif node.value.id in bundles:
                used["bundle"].add(node.attr)
    return used


def test_the_python_check_sees_what_it_looks_for():
    used = python_calls("import cbam_deploy\nb = cbam_deploy.export(m, 'x')\nb.verify()\ncbam_deploy.nothing\n")
    assert used == {"cbam_deploy": {"export", "nothing"}, "bundle": {"verify"}}


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)], ids=_rel)
def test_every_python_block_parses_and_uses_the_api_as_it_is(page):
    import cbam_deploy
    from cbam_deploy.api import Bundle

    for block in _python_blocks(page):
        used = python_calls(block)  # a syntax error fails here
        assert all(hasattr(cbam_deploy, name) for name in used["cbam_deploy"]), used["cbam_deploy"]
        assert all(hasattr(Bundle, name) for name in used["bundle"]), used["bundle"]
