"""Every number in a table or paragraph of README.md and docs/*.md that names its JSON is compared
with that JSON, to the precision it is printed at.

The convention (docs/provenance.md says it for writers):

    Source: `docs/data/NAME.json` (the command that wrote it)
    <!-- check rows=PATH key=FIELD[,FIELD...]
    COLUMN HEADER: SPEC, SPEC
    OTHER HEADER: text
    -->
    | key | COLUMN HEADER | ... |

- The comment starts a line and follows a line starting with `Source:` that names a file under docs/data/ (within the
  three lines above it). HTML comments do not show when the Markdown is rendered.
- `rows=PATH key=F,...` (a table with one JSON row per table row): PATH leads to a list of objects (or
  an object of objects; the key is then `@key`); the table's first columns hold the key fields. Each
  `HEADER: SPEC, ...` line maps a column: the numbers of each cell, in order, are compared with the
  row's fields. `HEADER: text` declares a column of words that holds no result (its numbers are not
  checked); any other column must hold no number.
- Without `rows=` (a table of named figures): each line `ROW LABEL: SPEC, ...` maps the numbers of the
  row whose first cell is ROW LABEL (bold and backticks dropped), in order, over all its other cells.
  A row with numbers and no line fails.
- `<!-- check prose: SPEC, SPEC -->` before a paragraph (or a list item): each value must appear in
  the paragraph (the item) that follows, at some precision it is printed with. Where a visible Source
  line would clutter the text (a summary that cites the document holding the table), the comment
  may name its JSON itself: `<!-- check source=docs/data/NAME.json prose: ... -->`.
- SPEC is a dotted path into the JSON (`pooled.0.diff`; list indices and object keys alike), optionally
  `1/PATH`, `PATH*N` or `PATH/N` (`*100` for a percentage), or `-` for a number that is not from this
  JSON (the text beside it must say where it comes from).
- A printed number p with d decimals matches a value v when |v - p| <= half a unit of its last digit
  (5e-4 for 0.031); `−` is a minus, `2,640` is 2640, `1.7e-5` has the precision of its mantissa.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_DATA_BYTES = 64 * 1024

CHECK = re.compile(r"^<!--\s*check\b(.*?)-->", re.S | re.M)   # at the start of a line
SOURCE = re.compile(r"docs/data/[\w.\-/]+\.json")
NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+−]?\d+)?")
LIST_ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s")
SPEC = re.compile(r"^(1/)?([^*/\s]+)(?:([*/])([\d.]+(?:e\d+)?))?$")


# ---------------------------------------------------------------- the checker


def numbers(text: str) -> list[str]:
    """The numbers printed in `text`, as written (markup ignored)."""
    return NUMBER.findall(text.replace("**", "").replace("`", ""))


def matches(printed: str, value: float) -> bool:
    """Whether `value` rounds to `printed` at the precision it is printed with."""
    s = printed.replace("−", "-").replace(",", "").lstrip("+")
    mantissa, _, exp = s.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    tol = 0.5 * 10.0 ** ((int(exp) if exp else 0) - decimals)
    return abs(float(value) - float(s)) <= tol * (1 + 1e-9) + 1e-12


def lookup(data, path: str):
    node = data
    for part in path.split("."):
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise KeyError(f"{path}: no list index {part!r}")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"{path}: no field {part!r}")
    return node


def value(data, spec: str) -> float | None:
    """The number a SPEC names (None for `-`)."""
    spec = spec.strip()
    if spec == "-":
        return None
    m = SPEC.match(spec)
    if not m:
        raise ValueError(f"bad spec {spec!r}: a dotted path, 1/PATH, PATH*N, PATH/N or -")
    inverse, path, op, factor = m.groups()
    v = lookup(data, path)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{path} is {v!r}, not a number")
    v = 1 / v if inverse else v
    return v * float(factor) if op == "*" else v / float(factor) if op == "/" else v


def cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in parts[1:-1]]


def clean(cell: str) -> str:
    return cell.replace("**", "").replace("`", "").strip()


@dataclass
class Block:
    doc: Path
    line: int
    source: str | None
    header: str
    spec: list[tuple[str, str]]
    after: list[str]

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def unfenced(text: str) -> str:
    """`text` with every fenced code block blanked (line numbers kept): examples are not checked."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def _bare(printed: str) -> bool:
    """A number printed without decimals or exponent."""
    return not re.search(r"[.eE]", printed)


def blocks(doc: Path, text: str | None = None) -> list[Block]:
    text = unfenced(doc.read_text(encoding="utf-8") if text is None else text)
    out = []
    for m in CHECK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").split("\n")[-3:]
        sources = [SOURCE.search(b) for b in before if b.lstrip().startswith("Source:")]
        source = next((s.group(0) for s in reversed(sources) if s), None)
        inline = re.search(r"\bsource=(\S+)", m.group(1))
        source = inline.group(1) if inline else source
        body = m.group(1).split("\n")          # [the rest of the "check" line, spec lines...]
        header = body[0].strip()
        spec = [tuple(x.strip() for x in l.rpartition(":")[::2]) for l in body[1:] if l.strip()]
        after = text[m.end():].lstrip("\n").split("\n")
        out.append(Block(doc, line, source, header, spec, after))
    return out


def check_block(b: Block, data) -> list[str]:
    """Every disagreement between block `b`'s table or paragraph and `data`."""
    if "prose:" in b.header:
        para = []
        for l in b.after:
            if not para and l.lstrip().startswith("<!--"):
                continue                  # further check comments stacked before the same text
            if not l.strip() or (para and (LIST_ITEM.match(l) or l.lstrip().startswith("<!--"))):
                break
            para.append(l)
        printed = numbers(" ".join(para))
        errors = []
        for spec in b.header.partition("prose:")[2].split(","):
            v = value(data, spec)
            # a fraction is not "printed" by a bare 0 or 1 (a seed, a count) standing beside it in the text
            if v is not None and not any(matches(p, v) and not (_bare(p) and 0 < abs(v) < 1) for p in printed):
                errors.append(f"{spec.strip()} = {v!r} is not printed in the paragraph after it")
        return errors
    table = []
    for l in b.after:
        if not l.lstrip().startswith("|"):
            break
        table.append(cells(l))
    if len(table) < 3:
        return ["no table right after the check comment"]
    head, rows = table[0], table[2:]
    options = dict(o.split("=", 1) for o in b.header.split() if "=" in o)
    if "rows" in options:
        return _check_rows(head, rows, b.spec, options, data)
    return _check_named(rows, b.spec, data)


def _compare(where: str, cell: str, specs: list[str], data) -> list[str]:
    printed = numbers(cell)
    if len(printed) != len(specs):
        return [f"{where}: {len(printed)} numbers ({', '.join(printed)}) for {len(specs)} specs ({', '.join(specs)})"]
    errors = []
    for p, spec in zip(printed, specs):
        v = value(data, spec)
        if v is not None and not matches(p, v):
            errors.append(f"{where}: printed {p}, {spec} = {v!r}")
    return errors


def _check_rows(head, rows, spec, options, data) -> list[str]:
    found = lookup(data, options["rows"])
    items = [{"@key": k, **v} for k, v in found.items()] if isinstance(found, dict) else list(found)
    keys = options.get("key", "").split(",") if options.get("key") else []
    mapped = {h: [s.strip() for s in v.split(",")] for h, v in spec}
    errors = [f"column {h!r} is not in the table" for h in mapped if h not in head]
    for row in rows:
        label = " / ".join(row[:len(keys)])
        hits = [it for it in items if all(_key_equal(c, it.get(k)) for c, k in zip(row, keys))]
        if len(hits) != 1:
            errors.append(f"row {label!r}: {len(hits)} JSON rows match its key {keys}")
            continue
        for h, c in zip(head[len(keys):], row[len(keys):]):
            if mapped.get(h) == ["text"]:
                continue
            if h in mapped:
                errors += _compare(f"row {label!r}, column {h!r}", c, mapped[h], hits[0])
            elif numbers(c):
                errors.append(f"row {label!r}, column {h!r}: numbers with no mapping (map it, or mark it 'text')")
    return errors


def _key_equal(cell: str, field) -> bool:
    if isinstance(field, (int, float)) and not isinstance(field, bool):
        printed = numbers(cell)
        return bool(printed) and matches(printed[0], field)
    return clean(cell) == str(field)


def _check_named(rows, spec, data) -> list[str]:
    named = {label: [s.strip() for s in v.split(",")] for label, v in spec}
    errors, seen = [], set()
    for row in rows:
        label, rest = clean(row[0]), " | ".join(row[1:])
        if label in named:
            seen.add(label)
            errors += _compare(f"row {label!r}", rest, named[label], data)
        elif numbers(rest):
            errors.append(f"row {label!r}: numbers with no line in the check comment")
    return errors + [f"no row {label!r} in the table" for label in named if label not in seen]


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


# ---------------------------------------------------------------- the docs


@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b.where)
def test_numbers_match_their_json(block):
    assert block.source, f"{block.where}: a check comment needs a 'Source: docs/data/...json' line right above it"
    path = ROOT / block.source
    assert path.is_file(), f"{block.where}: {block.source} is not committed"
    errors = check_block(block, json.loads(path.read_text(encoding="utf-8")))
    assert not errors, f"{block.where} ({block.source}):\n  " + "\n  ".join(errors)


def test_data_files_are_small_json():
    for path in sorted((ROOT / "docs/data").glob("*.json")):
        assert path.stat().st_size <= MAX_DATA_BYTES, f"{path.name}: keep committed results small (extracts)"
        json.loads(path.read_text(encoding="utf-8"))


def tables(text: str):
    """(line number, header line, the lines above it, whether a check comment is right above it) of
    every Markdown table whose body holds a number outside its first column."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and (i == 0 or not lines[i - 1].lstrip().startswith("|")):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            if any(numbers(" ".join(cells(l)[1:])) for l in lines[i + 2:j]):
                k = i                   # a check comment right above the table: look above it
                if k and lines[k - 1].rstrip().endswith("-->"):
                    while k and "<!--" not in lines[k - 1]:
                        k -= 1
                    k -= 1
                checked = k < i and CHECK.search("\n".join(lines[k:i])) is not None
                out.append((i + 1, lines[i].strip(), lines[max(0, k - 6):k], checked))
            i = j
        else:
            i += 1
    return out


#: tables written before the rule, without a Source line: docs/provenance.md lists where each comes
#: from and what a rerun costs. The list only shrinks: a new table with numbers names its source.
UNSOURCED = json.loads((ROOT / "tests/data/unsourced_tables.json").read_text(encoding="utf-8"))


def test_every_table_names_its_source():
    missing, allowed, seen = [], {(d["doc"], d["header"]) for d in UNSOURCED}, set()
    for doc in DOCS:
        rel = str(doc.relative_to(ROOT))
        for line, header, above, checked in tables(unfenced(doc.read_text(encoding="utf-8"))):
            sources = [l for l in above if l.lstrip().startswith("Source:")]
            if not sources and (rel, header) in allowed:
                seen.add((rel, header))
            elif not sources:
                missing.append(f"{rel}:{line} {header[:60]}")
            elif any(SOURCE.search(l) for l in sources):
                assert checked, f"{rel}:{line} names its JSON but has no check comment right above it"
    assert not missing, "tables with numbers and no 'Source:' line above them:\n  " + "\n  ".join(missing)
    stale = sorted(allowed - seen)
    assert not stale, f"tests/data/unsourced_tables.json lists tables that now have a source or are gone: {stale}"


# ---------------------------------------------------------------- the checker itself


DATA = {"pooled": [{"task": "a", "k": 10, "diff": -0.0312, "ci": [-0.049, -0.0138], "n": 2640}],
        "speed": {"fast": 1.8747, "ratio": 48.994, "err": 1.7185e-05, "share": 0.513}}


def run(md: str) -> list[str]:
    (b,) = blocks(ROOT / "README.md", md)
    return check_block(b, DATA)


def test_checker_accepts_what_is_printed_right():
    assert matches("−0.031", -0.0312) and matches("+0.03", 0.034) and matches("2,640", 2640)
    assert matches("1.7e-5", 1.7185e-05) and not matches("1.8e-5", 1.7185e-05)
    assert not matches("0.032", -0.0312) and not matches("0.031", 0.0316)
    assert numbers("**−0.031** [−0.049, −0.014] (p = 0.0003), 49.0×, 51%, H200") == [
        "−0.031", "−0.049", "−0.014", "0.0003", "49.0", "51"]
    md = ("Source: `docs/data/x.json` (cmd)\n<!-- check rows=pooled key=task,k\nΔ: diff, ci.0, ci.1\nn: n\n"
          "note: text\n-->\n| task | k | Δ | n | note |\n|---|---|---|---|---|\n"
          "| a | 10 | −0.031 [−0.049, −0.014] | 2,640 | layers 1-29 |\n")
    assert run(md) == []
    named = ("Source: docs/data/x.json\n<!-- check\nfast, s per prompt: speed.fast, -\nfast / reference: speed.ratio\n-->\n"
             "| figure | value |\n|---|---|\n| fast, s per prompt | **1.87** (3.75 s for both) |\n"
             "| fast / reference | 49.0× |\n")
    assert run(named) == []
    assert run("Source: docs/data/x.json\n<!-- check prose: speed.share*100, 1/speed.ratio -->\n"
               "It copies in 51% of prompts, 0.0204 of the time.\n") == []


def test_checker_catches_mistakes():
    base = ("Source: docs/data/x.json\n<!-- check rows=pooled key=task\nΔ: diff, ci.0, ci.1\n-->\n"
            "| task | Δ | n |\n|---|---|---|\n| a | {cell} | {n} |\n")
    assert "printed −0.032" in run(base.format(cell="−0.032 [−0.049, −0.014]", n="x"))[0]
    assert "2 numbers" in run(base.format(cell="−0.031 [−0.049]", n="x"))[0]
    assert "no mapping" in run(base.format(cell="−0.031 [−0.049, −0.014]", n="50"))[0]
    with pytest.raises(KeyError, match="no field 'dif'"):
        run(base.replace("diff,", "dif,").format(cell="−0.031 [−0.049, −0.014]", n="x"))
    assert "0 JSON rows" in run(base.format(cell="0", n="x").replace("| a |", "| b |"))[0]
    assert "no line" in run("Source: docs/data/x.json\n<!-- check\n-->\n| f | v |\n|---|---|\n| x | 3 |\n")[0]
    assert run("<!-- check source=docs/data/x.json prose: speed.fast -->\n- fast: 1.87 s\n- slow: 9 s\n") == []
    assert "not printed" in run("<!-- check source=docs/data/x.json prose: speed.fast -->\n- fast: 9 s\n- 1.87\n")[0]
    assert "not printed" in run("Source: docs/data/x.json\n<!-- check prose: speed.share*100 -->\n"
                                "It copies in 52% of prompts.\n")[0]
    # a share is not printed by a seed number beside it (0.513 is within 0.5 of "seed 1", but no printed share)
    assert "not printed" in run("Source: docs/data/x.json\n<!-- check prose: speed.share -->\n"
                                "Seed 1 copies in 0.49 of prompts.\n")[0]
