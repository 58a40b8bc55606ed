#!/usr/bin/env python3
"""Checks that every section citation in the tree names a section that exists.

The code and the docs cite this project's specification by section: `DECISIONS §5.1`,
`registration.md §4.5`, `docs/wire-format.md §12`, `architecture.md §3`, and often just
`§4.5` after a document was named once. This script finds every such citation and fails,
listing them all, when a cited section has no heading of that number in docs/.

Rules, in the order they are applied to each `§N` found:
  * `RFC 4648 §5` and the like cite an external document and are skipped.
  * A citation takes the last document named before it on the same line
    ("registration.md §2.3, §4.5; DECISIONS §5.2–§5.6" cites three documents' sections),
    unless a closing bracket or a full stop comes between them: "(DECISIONS §5.12); see §2.3"
    is bare.
  * With no document before it on its line, it continues the previous line's citation list
    when that line ends in a document name or a citation followed by nothing or a comma
    ("(registration.md\n// §3.6)", "(registration.md §3.3,\n// §3.4)").
  * Otherwise it is bare, and resolves against the document its file is about: the first
    document named in the file's header comment; a file whose header names none (a .cpp)
    takes the header comment of its first quoted #include. A document in docs/ resolves bare
    citations against itself. A bare citation with no such document is reported as ambiguous.
  * A range (`§5.2–§5.6`, `§4.3.7–8`) checks both ends; a short end replaces the last parts of
    the first (`§4.3.7–8` ends at 4.3.8).
  * `§x.y.z` names a heading "x.y.z", or step z of the numbered list under heading "x.y".

Usage: check_references.py [--list] [REPO_ROOT]   (default: the repository this file lives in;
--list prints every citation with the section it resolved to)
Standard library only.
"""

from __future__ import annotations

import pathlib
import re
import sys

DOCUMENTS = {
    "DECISIONS": "docs/DECISIONS.md",
    "registration.md": "docs/registration.md",
    "wire-format.md": "docs/wire-format.md",
    "architecture.md": "docs/architecture.md",
    "cluster.md": "docs/cluster.md",
}

SCANNED = ["src", "include", "daemon", "cli", "client", "python", "tests", "benchmarks", "docs",
           "examples", "proto", "scripts", "README.md"]
TEXT_SUFFIXES = {".cpp", ".hpp", ".h", ".cu", ".cuh", ".py", ".md", ".txt", ".cmake", ".proto",
                 ".sh", ".in", ".service", ""}
SKIPPED_DIRS = {"__pycache__", ".git", "build", ".pytest_cache", ".ruff_cache"}

DOC_RE = re.compile(r"\b(DECISIONS(?:\.md)?|registration\.md|wire-format\.md|architecture\.md|cluster\.md)(?![\w-])")
NUM = r"\d+(?:\.\d+)*"
CITE_RE = re.compile(r"§\s?(" + NUM + r")(?:\s?[–-]\s?(§\s?)?(" + NUM + r"))?")
EXTERNAL_RE = re.compile(r"\bRFC\s?\d+\s*$")
HEADING_RE = re.compile(r"^#{1,6}\s+(" + NUM + r")\.?\s")
STEP_RE = re.compile(r"^\s{0,3}(\d+)\.\s")
INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
# A line whose citation list is still open at its end: a document name or a citation followed
# by nothing, a comma or an opening bracket (not a closing one or a full stop).
TAIL_RE = re.compile(r"(?:" + DOC_RE.pattern + r"|§\s?" + NUM + r"(?:\s?[–-]\s?§?\s?" + NUM + r")?)"
                     r"[`'\"(,;\s]*$")


def doc_key(name: str) -> str:
    return "DECISIONS" if name.startswith("DECISIONS") else name


class Sections:
    """The section numbers of one document: its numbered headings and their numbered steps."""

    def __init__(self, path: pathlib.Path) -> None:
        self.headings: set[str] = set()
        self.steps: set[str] = set()
        if not path.is_file():
            return
        current = None
        fenced = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                continue
            heading = HEADING_RE.match(line)
            if heading:
                current = heading.group(1)
                self.headings.add(current)
                continue
            step = STEP_RE.match(line)
            if step and current is not None:
                self.steps.add(current + "." + step.group(1))

    def has(self, number: str) -> bool:
        return number in self.headings or number in self.steps


def header_comment(lines: list[str]) -> str:
    """The file's opening comment: leading //, # or docstring lines."""
    out: list[str] = []
    in_docstring = False
    for line in lines:
        s = line.strip()
        if in_docstring:
            out.append(s)
            if '"""' in s:
                break
            continue
        if s.startswith('"""'):
            out.append(s)
            if s.count('"""') >= 2:
                break
            in_docstring = True
            continue
        if s.startswith("//") or (s.startswith("#") and not s.startswith("#include")
                                  and not s.startswith("#pragma")):
            out.append(s)
            continue
        if not s and not out:
            continue
        break
    return "\n".join(out)


def first_document(text: str) -> str | None:
    m = DOC_RE.search(text)
    return doc_key(m.group(1)) if m else None


def companion(root: pathlib.Path, path: pathlib.Path, lines: list[str]) -> pathlib.Path | None:
    for line in lines:
        m = INCLUDE_RE.match(line)
        if not m:
            continue
        name = m.group(1)
        for base in (path.parent, root / "include", root / "src", root):
            candidate = base / name
            if candidate.is_file():
                return candidate
        return None
    return None


def file_document(root: pathlib.Path, path: pathlib.Path, lines: list[str]) -> str | None:
    rel = path.relative_to(root).as_posix()
    for key, doc in DOCUMENTS.items():
        if rel == doc:
            return key
    own = first_document(header_comment(lines))
    if own:
        return own
    other = companion(root, path, lines)
    if other is not None:
        return first_document(header_comment(other.read_text(encoding="utf-8", errors="replace")
                                             .splitlines()))
    return None


def ends(first: str, second: str | None, absolute: bool) -> list[str]:
    if second is None:
        return [first]
    if absolute:
        return [first, second]
    a, b = first.split("."), second.split(".")
    if len(b) >= len(a):
        return [first, second]
    return [first, ".".join(a[: len(a) - len(b)] + b)]


def scan_file(root: pathlib.Path, path: pathlib.Path, sections: dict[str, Sections],
              problems: list[str], listing: bool) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return 0
    if "§" not in text:
        return 0
    lines = text.splitlines()
    rel = path.relative_to(root).as_posix()
    bare_doc: str | None = None
    bare_known = False
    carried: str | None = None  # the previous line's document, when that line ended in a citation
    count = 0
    for number, line in enumerate(lines, 1):
        mentions = [(m.start(), doc_key(m.group(1))) for m in DOC_RE.finditer(line)]
        last_doc: str | None = None
        for cite in CITE_RE.finditer(line):
            if EXTERNAL_RE.search(line[: cite.start()]):
                continue
            before = [(pos, d) for pos, d in mentions if pos < cite.start()]
            if before:
                # A closed bracket or a full stop between the name and the citation ends the list.
                gap = line[before[-1][0]:cite.start()]
                doc = None if (")" in gap or ". " in gap) else before[-1][1]
            else:
                doc = carried
            where = f"{rel}:{number}: §{cite.group(0)[1:].strip()}"
            if doc is None:
                if not bare_known:
                    bare_doc = file_document(root, path, lines)
                    bare_known = True
                doc = bare_doc
                if doc is None:
                    problems.append(f"{where}: ambiguous: the file's header comment names no document "
                                    "(name one of: " + ", ".join(DOCUMENTS) + ")")
                    count += 1
                    continue
            last_doc = doc
            for wanted in ends(cite.group(1), cite.group(3), bool(cite.group(2))):
                count += 1
                if listing:
                    print(f"{rel}:{number}: {DOCUMENTS[doc]} §{wanted}")
                if not sections[doc].has(wanted):
                    problems.append(f"{where}: {DOCUMENTS[doc]} has no section {wanted}")
        carried = None
        tail = TAIL_RE.search(line)
        if tail:
            named = DOC_RE.match(line, tail.start())
            carried = doc_key(named.group(1)) if named else last_doc
    return count


def files_under(root: pathlib.Path, name: str) -> list[pathlib.Path]:
    top = root / name
    if top.is_file():
        return [top]
    if not top.is_dir():
        return []
    return sorted(p for p in top.rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    listing = "--list" in argv
    argv = [a for a in argv if a != "--list"]
    root = pathlib.Path(argv[1]).resolve() if len(argv) > 1 else pathlib.Path(__file__).resolve().parents[2]
    sections = {key: Sections(root / doc) for key, doc in DOCUMENTS.items()}
    for key, doc in DOCUMENTS.items():
        if not sections[key].headings:
            print(f"check_references: {doc} is missing or has no numbered headings", file=sys.stderr)
            return 1
    problems: list[str] = []
    checked = 0
    files = 0
    for name in SCANNED:
        for path in files_under(root, name):
            if SKIPPED_DIRS.intersection(path.relative_to(root).parts):
                continue
            if path.suffix not in TEXT_SUFFIXES or path.resolve() == pathlib.Path(__file__).resolve():
                continue
            files += 1
            checked += scan_file(root, path, sections, problems, listing)
    for p in problems:
        print(p)
    print(f"check_references: {checked} citations in {files} files, {len(problems)} unresolved",
          file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
