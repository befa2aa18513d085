"""The documentation's links hold, and the README's set-up commands are the ones CI runs.

README.md is the front page and docs/*.md hold the rest; pages point at each other with relative
links, often at one heading (`page.md#anchor`). A heading renamed or a section moved breaks such a
link silently on GitHub, so every relative link here must name an existing file, and an anchor
must name a heading of its page under GitHub's rules (lowercase; punctuation other than `-` and
`_` dropped; each space a `-`; a repeated heading gets `-1`, `-2`, ...). Links inside code
(fenced blocks and `inline spans`) are not links and are skipped, and so are headings in fenced
blocks (a shell comment is not a heading).

The threat model (docs/security.md) names the test behind each claim; those tests must exist.

The two set-up commands are a contract: the first is what a newcomer types to see the demo, the
second is what `.ci/run` runs, ruff's lint and format check before the tests.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]

DEMO_COMMAND = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[plot]' && .venv/bin/ftsim"
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]'"
    " && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/python -m pytest"
)


def doc_pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    pages += [REPO / "benchmarks" / "README.md", REPO / "docker" / "README.md"]
    return [p for p in pages if p.exists()]


FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target), optionally with a "title"; the text may hold inline code.
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (as github-slugger makes it from the rendered text)."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags render to nothing
    text = text.replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(text))
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the page's prose."""
    out = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        m = REFERENCE_DEF.match(line)
        if m:
            out.append((number, m.group(1)))
            continue
        # Inline code is not a link, but a link's text may be code: drop only spans outside links.
        masked = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)
        for m in INLINE_LINK.finditer(masked):
            start, end = m.span(2)
            out.append((number, line[start:end]))
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def check_link(page: Path, target: str) -> str | None:
    """Why the link is broken, or None."""
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    dest = (page.parent / path_part).resolve() if path_part else page
    try:
        dest.relative_to(REPO)
    except ValueError:
        return f"{target}: points outside the repository"
    if not dest.exists():
        return f"{target}: no such file ({dest.relative_to(REPO)})"
    if anchor and dest.suffix == ".md":
        if unquote(anchor) not in anchors(dest):
            return f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}"
    return None


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_names_an_existing_file_and_heading(page):
    broken = []
    for number, target in links(page):
        if not target or is_external(target):
            continue
        why = check_link(page, target)
        if why:
            broken.append(f"{page.relative_to(REPO)}:{number}: {why}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links_and_their_breakage(tmp_path, monkeypatch):
    # The checker itself, on a page made for it: it must find the links it is meant to check,
    # skip code, and tell a missing file and a missing heading apart from good links.
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## What `ftsim` writes: outputs?\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "See [other](other.md#what-ftsim-writes-outputs), [the second](other.md#twice-1) and [up](#page).\n"
        "Broken: [gone](missing.md), [no heading](other.md#nothing-here), [out](../../etc/passwd).\n"
        "Not links: `[code](nowhere.md)` and https://example.org, [web](https://example.org/x.md).\n"
        "```bash\n# not a heading\ncat [x](inside-a-fence.md)\n```\n"
        "[ref]: other.md#twice\n"
    )
    targets = [t for _, t in links(page)]
    assert targets == [
        "other.md#what-ftsim-writes-outputs",
        "other.md#twice-1",
        "#page",
        "missing.md",
        "other.md#nothing-here",
        "../../etc/passwd",
        "https://example.org/x.md",
        "other.md#twice",
    ]
    verdicts = {t: check_link(page, t) for t in targets if not is_external(t)}
    assert [t for t, why in verdicts.items() if why] == ["missing.md", "other.md#nothing-here", "../../etc/passwd"]
    assert "not-a-heading" not in anchors(page)


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("Does federation help? `--baselines`", "does-federation-help---baselines"),
        ("What ftserver leaves in `--out`", "what-ftserver-leaves-in---out"),
        ("Set-up: two commands", "set-up-two-commands"),
        (
            "A network attacker, or any host that reaches the coordinator's port",
            "a-network-attacker-or-any-host-that-reaches-the-coordinators-port",
        ),
        ("`train.local_patience` and [links](x.md)", "trainlocal_patience-and-links"),
    ],
)
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {
        (REPO / unquote(t.partition("#")[0])).resolve()
        for _, t in links(REPO / "README.md")
        if not is_external(t) and t.partition("#")[0]
    }
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def readme_setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Set-up: two commands\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)]


def test_the_readme_has_exactly_the_two_setup_commands():
    assert readme_setup_commands() == [DEMO_COMMAND, TEST_COMMAND]


def test_ci_runs_exactly_the_readmes_test_command():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [
        line.strip()
        for line in lines[1:]
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert commands == [readme_setup_commands()[1]]
    # ruff's lint and format check run before the tests, so a lint error fails CI at once.
    command = commands[0]
    assert command.index("ruff check .") < command.index("ruff format --check .") < command.index("pytest")


# `test_x.py::test_name`, `integration/test_x.py`, or `::test_name` (in the file named last before it).
TEST_REFERENCE = re.compile(r"`((?:integration/)?test_\w+\.py)?(?:::(test_\w+))?`")


def test_the_tests_the_threat_model_names_exist():
    # The threat model backs each claim with the test that plays the hostile side; a test renamed
    # or moved would leave the claim pointing at nothing.
    text = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    last, named, missing = None, 0, []
    for m in TEST_REFERENCE.finditer(text):
        file, function = m.groups()
        if not file and not function:
            continue
        last = file or last
        assert last, f"{m.group(0)} names no file before it"
        path = REPO / "tests" / (last if last.startswith("integration/") else f"unit/{last}")
        named += 1
        if not path.exists():
            missing.append(f"{last}: no such test file")
        elif function and not re.search(rf"^def {function}\(", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"{last}::{function}: no such test")
    assert named >= 30, f"only {named} test references found in the threat model"
    assert not missing, "\n".join(missing)


def test_the_readmes_loading_snippet_loads_a_saved_adapter_offline(tiny_config, tiny_peft_model, tmp_path):
    """The README's Python snippet, run as written (only the folder replaced) in a clean process
    with the hub switched off, loads an adapter saved as a run saves it, with its tokenizer."""
    import os
    import subprocess
    import sys

    from fedtune.common import methods
    from fedtune.common.checkpoint import save_adapter

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    snippet = next(b for b in blocks if "AutoPeftModelForCausalLM" in b)
    model, _, _ = tiny_peft_model
    folder = tmp_path / "run" / "adapter"
    save_adapter(
        folder,
        methods.get_state(model),
        methods.saved_peft_config(model, methods.base_reference(tiny_config.model)),
        {methods.METHOD_FILE: methods.method_info(tiny_config)},
    )
    assert "ftsim-runs/RUN/adapter" in snippet
    code = snippet.replace("ftsim-runs/RUN/adapter", str(folder)) + "\nprint(type(model).__name__, len(tokenizer))\n"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "PeftModelForCausalLM"
