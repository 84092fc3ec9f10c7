"""The documentation holds together: every relative link in README.md, docs/*.md and bench/README.md leads
to a file that exists and, with `#anchor`, to a heading in it; the README stays a short guide with a
contents list; the service's error and environment tables live in one place."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = ["config.md", "cli.md", "http-api.md", "containers.md", "formats.md", "models.md"]


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but hyphens and underscores removed, each
    space a hyphen. Inline code keeps its text, a link its label."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        found += [(number, target) for target in LINK.findall(line)]
    return found


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def broken_links(path: Path) -> list[str]:
    """'FILE:LINE: TARGET: why' for each relative link of `path` that leads nowhere."""
    problems = []
    for number, target in links(path):
        if not is_relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.name}:{number}: {target}"
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.name}")
        elif anchor and dest.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


def contents(path: Path) -> list[tuple[int, str]]:
    """The links of the list under the `## Contents` heading."""
    lines = prose_lines(path.read_text(encoding="utf-8"))
    start = next((i for i, (_, line) in enumerate(lines) if re.match(r"^##\s+Contents\s*$", line)), None)
    if start is None:
        return []
    found = []
    for number, line in lines[start + 1 :]:
        if HEADING.match(line):
            break
        found += [(number, target) for target in LINK.findall(line)]
    return found


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


def test_the_reference_pages_exist():
    for page in PAGES:
        assert (ROOT / "docs" / page).is_file(), page


def test_the_readme_is_a_short_guide():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 400


def test_the_readme_has_a_contents_list_near_the_top_whose_links_resolve():
    entries = contents(README)
    assert entries, "README.md has no `## Contents` list"
    assert entries[0][0] <= 40, "the contents list is not near the top"
    targets = [target for _, target in entries]
    headings = {slug(m.group(2)) for _, line in prose_lines(README.read_text(encoding="utf-8"))
                if (m := HEADING.match(line)) and m.group(1) == "##"}  # fmt: skip
    assert headings - {"contents"} <= {t[1:] for t in targets if t.startswith("#")}, "a section missing"
    assert {f"docs/{page}" for page in PAGES} <= {t.partition("#")[0] for t in targets}, "a page missing"
    readme_anchors = anchors(README)
    for number, target in entries:
        file_part, _, anchor = target.partition("#")
        dest = ROOT / file_part if file_part else README
        assert dest.exists(), (number, target)
        assert not anchor or anchor in (readme_anchors if dest == README else anchors(dest)), (number, target)


def test_a_broken_link_is_caught(tmp_path):
    other = "# Other page\n\n## A `code` heading: with punctuation\n\n## Twice\n\n## Twice\n"
    (tmp_path / "other.md").write_text(other)
    (tmp_path / "pic.png").write_bytes(b"")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n## Here\n\n"
        "[fine](other.md) [fine](other.md#a-code-heading-with-punctuation) [fine](#here) [fine](other.md#twice-1)\n"
        "![fine](pic.png) [outside](https://example.com/missing.md#nowhere) `[in code](gone.md)`\n"
        "```\n[in a code block](gone.md)\n```\n"
        "[missing file](gone.md)\n"
        "[bad anchor](other.md#no-such-heading)\n"
        "[bad local anchor](#nowhere)\n"
        "[third of a heading that is there twice](other.md#twice-2)\n"
    )
    problems = broken_links(doc)
    assert [p.split(": ")[0] for p in problems] == ["doc.md:10", "doc.md:11", "doc.md:12", "doc.md:13"], problems
    assert "no such file" in problems[0] and "no heading #no-such-heading" in problems[1]


def test_the_anchor_rule():
    assert slug("`seg plan`: a config from the data") == "seg-plan-a-config-from-the-data"
    assert slug("INT8 on the CPU, fp16 and I/O binding on the GPU") == "int8-on-the-cpu-fp16-and-io-binding-on-the-gpu"
    assert slug("`service.py --soak`: good and bad requests") == "servicepy---soak-good-and-bad-requests"
    assert slug("Annotation tools' exports") == "annotation-tools-exports"
    assert slug("snake_case and [a link](x.md)") == "snake_case-and-a-link"


def test_the_error_and_environment_tables_live_in_one_place():
    """The HTTP status table and the SEG_* table are in docs/http-api.md alone; code points there."""
    error_row = re.compile(r"^\s*\|?\s*`?413`?\s*(\||\s{2,})")
    env_row = re.compile(r"^\s*\|\s*`?SEG_MAX_BYTES`?\s*\|")
    files = [*documents(), *sorted((ROOT / "serving").glob("*.py"))]

    def holding(row: re.Pattern) -> list[str]:
        return [p.relative_to(ROOT).as_posix() for p in files if any(map(row.match, p.read_text().splitlines()))]

    assert holding(error_row) == ["docs/http-api.md"]
    assert holding(env_row) == ["docs/http-api.md"]


OLD_MODULES = (
    "imageio|predictor|batch|annotations|tiling|runtime|sources|writers|tiff|modelinfo|preprocess|progress|ray_batch"
)
OLD_PATH = re.compile(rf"(?<![\w./])seg(?:\.(?:{OLD_MODULES})\b|/(?:{OLD_MODULES}|cli|data)\.py\b)")


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_names_a_module_that_moved(doc):
    assert OLD_PATH.findall(doc.read_text(encoding="utf-8")) == []
