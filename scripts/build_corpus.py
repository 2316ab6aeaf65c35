#!/usr/bin/env python3
"""Build the small multi-domain text corpus bundled with ``moemerge.zoo``.

The corpus feeds the tiny MoE test models (see ``scripts/train_zoo.py``) and
the calibration / evaluation helpers. It is deliberately small (< 3 MB) so it
can live in the git repository, yet it has three clearly distinct *domains* so
that routers of the tiny MoE models have something to specialise on:

* ``bible``        - chapters of the King James Bible (public domain),
                     printed by the ``bible`` CLI of Debian's ``bible-kjv``.
* ``python-code``  - modules of the Python 3.11 standard library as shipped by
                     Debian's ``libpython3.11-stdlib`` (PSF licence).
* ``python-docs``  - the Python 3.11 HTML documentation shipped by Debian's
                     ``python3.11-doc``, reduced to plain text with the stdlib
                     ``html.parser`` (PSF licence).

Everything comes from Debian packages, so the corpus can be rebuilt offline
with nothing but ``apt-get``. The script installs missing packages itself
(it needs root for that) and is fully deterministic: document sampling and the
train / validation / test split use a fixed seed and sorted inputs.

Output (relative to the repository root)::

    src/moemerge/zoo/data/corpus/train.jsonl
    src/moemerge/zoo/data/corpus/validation.jsonl
    src/moemerge/zoo/data/corpus/test.jsonl
    src/moemerge/zoo/data/corpus/LICENSES.md

Each JSONL line is ``{"text": ..., "domain": ...}``; one line = one document.
The split is *by document*, so no text of an evaluation document is ever seen
in training.

Usage::

    python scripts/build_corpus.py            # rebuild in place
    python scripts/build_corpus.py --seed 0   # the default seed
"""

from __future__ import annotations

import argparse
import glob
import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "moemerge" / "zoo" / "data" / "corpus"

# Byte budget per domain (UTF-8). Three domains x 0.95 MB keeps the whole
# corpus under the 3 MB limit while giving each split enough text.
DOMAIN_BUDGET = 950_000
# Code files are truncated so that one huge module cannot dominate the domain.
MAX_CODE_DOC = 20_000
# Documentation pages can be long too; keep pages diverse.
MAX_DOCS_DOC = 20_000
# Fractions of each domain's bytes that go to validation and test.
EVAL_FRACTION = 0.05

# Debian package -> what we use from it.
PACKAGES = {
    "bible-kjv": "the `bible` CLI that prints the KJV text",
    "bible-kjv-text": "the KJV text and concordance data read by `bible`",
    "libpython3.11-stdlib": "Python 3.11 standard library sources (/usr/lib/python3.11/*.py)",
    "python3.11-doc": "Python 3.11 HTML documentation (/usr/share/doc/python3.11/html)",
}

STDLIB_DIR = "/usr/lib/python3.11"
DOCS_DIR = "/usr/share/doc/python3.11/html"


# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------
def package_version(pkg: str) -> str | None:
    """Return the installed version of a Debian package, or None."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg],
            capture_output=True, text=True, check=True,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    status, _, version = out.partition("\t")
    return version if status.endswith("installed") and "not-installed" not in status else None


def ensure_packages() -> dict[str, str]:
    """Install the Debian packages we read from if they are missing.

    Returns ``{package: version}`` for the licence file.
    """
    missing = [p for p in PACKAGES if package_version(p) is None]
    if missing:
        print(f"[build_corpus] Debian packages missing: {' '.join(missing)}; "
              "installing them with apt-get (needs root and a Debian mirror) ...",
              file=sys.stderr)
        if os.geteuid() != 0:
            sys.exit("[build_corpus] not root: please run\n"
                     f"    sudo apt-get install -y {' '.join(missing)}\n"
                     "and rerun this script.")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True, env=env)
    versions = {}
    for p in PACKAGES:
        v = package_version(p)
        if v is None:
            sys.exit(f"[build_corpus] package {p} still not installed; giving up.")
        versions[p] = v
    return versions


# --------------------------------------------------------------------------
# Domain readers: each returns a sorted list of (doc_id, text)
# --------------------------------------------------------------------------
# The `bible` CLI pretty-prints when its output is not a terminal:
#   "Genesis 1" on a line of its own, then "  1 In the beginning ..." per verse.
# With a terminal it prints "Ge1:1 In the beginning ..." instead; accept both.
HEADER_RE = re.compile(r"^(\S.*?) (\d+)$")
PRETTY_VERSE_RE = re.compile(r"^\s+(\d+) (.*)$")
TERSE_VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_bible() -> list[tuple[str, str]]:
    """One document per chapter of the KJV, as printed by the ``bible`` CLI."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit("[build_corpus] the `bible` program (package bible-kjv) is not on PATH")
    # A single range prints the whole Bible.
    out = subprocess.run([exe, "-l100000", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    key = None
    for line in out.splitlines():
        if not line.strip():
            continue
        m = TERSE_VERSE_RE.match(line)
        if m:
            key, verse = (m.group(1), int(m.group(2))), f"{m.group(3)} {m.group(4).strip()}"
        elif (m := PRETTY_VERSE_RE.match(line)) and key is not None:
            verse = f"{m.group(1)} {m.group(2).strip()}"
        elif m := HEADER_RE.match(line):
            key = (m.group(1), int(m.group(2)))
            continue
        else:
            continue
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(verse)
    docs = []
    for i, (book, ch) in enumerate(order):
        text = f"{book} {ch}\n\n" + "\n".join(chapters[(book, ch)]) + "\n"
        docs.append((f"{i:04d}-{book}{ch}", text))
    if len(docs) < 1000:
        sys.exit(f"[build_corpus] only {len(docs)} Bible chapters parsed; bible CLI output changed?")
    return docs


def read_python_code() -> list[tuple[str, str]]:
    """One document per top-level stdlib module, truncated at a line boundary."""
    docs = []
    for path in sorted(glob.glob(os.path.join(STDLIB_DIR, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) > MAX_CODE_DOC:
            text = text[: text.rfind("\n", 0, MAX_CODE_DOC) + 1]
        if len(text.strip()) > 200:          # skip trivial stubs
            docs.append((os.path.basename(path), text))
    return docs


class _SphinxText(html.parser.HTMLParser):
    """Extract the readable text of the main ``<div class="body">`` of a Sphinx page.

    Navigation, sidebars and footers live outside that div and are dropped.
    Block-level tags become line breaks; ``<pre>`` keeps its whitespace so that
    code examples stay intact; permalink anchors ("¶") are skipped.
    """

    BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt",
             "dd", "tr", "table", "pre", "br", "blockquote", "ul", "ol", "dl"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.body_depth = 0       # >0 while inside the main body div (div nesting depth)
        self.pre_depth = 0
        self.skip_depth = 0       # inside a headerlink <a> or <script>/<style>

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = (attrs.get("class") or "").split()
        if self.body_depth == 0:
            if tag == "div" and "body" in cls and attrs.get("role") == "main":
                self.body_depth = 1
            return
        if tag == "div":
            self.body_depth += 1
        if self.skip_depth or (tag == "a" and "headerlink" in cls) or tag in ("script", "style"):
            self.skip_depth += 1
            return
        if tag == "pre":
            self.pre_depth += 1
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("* ")

    def handle_endtag(self, tag):
        if self.body_depth == 0:
            return
        if self.skip_depth:
            if tag in ("a", "script", "style"):
                self.skip_depth -= 1
            if tag == "div":
                self.body_depth -= 1
            return
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "div":
            self.body_depth -= 1

    def handle_data(self, data):
        if self.body_depth == 0 or self.skip_depth:
            return
        if self.pre_depth == 0:
            data = re.sub(r"\s+", " ", data)
        self.parts.append(data)

    def text(self) -> str:
        t = "".join(self.parts).replace("¶", "")
        t = re.sub(r"[ \t]+\n", "\n", t)
        t = re.sub(r"\n{3,}", "\n\n", t)
        return t.strip() + "\n"


def read_python_docs() -> list[tuple[str, str]]:
    """One document per HTML page of the Python documentation (plain text)."""
    docs = []
    for path in sorted(glob.glob(os.path.join(DOCS_DIR, "**", "*.html"), recursive=True)):
        rel = os.path.relpath(path, DOCS_DIR)
        # Index / search / generated listing pages are mostly link lists.
        if rel.startswith(("_", "genindex", "py-modindex", "search", "contents")) or "whatsnew/changelog" in rel:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            parser = _SphinxText()
            parser.feed(f.read())
        text = parser.text()
        if len(text) > MAX_DOCS_DOC:
            text = text[: text.rfind("\n", 0, MAX_DOCS_DOC) + 1]
        if len(text) > 1000:              # drop near-empty stubs
            docs.append((rel, text))
    return docs


# --------------------------------------------------------------------------
# Sampling and splitting
# --------------------------------------------------------------------------
def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def sample_to_budget(docs, budget, rng):
    """Randomly pick documents until the byte budget is filled (order kept sorted)."""
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    chosen, total = [], 0
    for i in idx:
        b = nbytes(docs[i][1])
        if total + b > budget:
            continue                       # try smaller documents to fill the gap
        chosen.append(i)
        total += b
    return [docs[i] for i in sorted(chosen)]


def split_domain(docs, rng):
    """Split one domain's documents into train / validation / test by document.

    Validation and test each receive at least EVAL_FRACTION of the domain's
    bytes (and at least one document); everything else is training data.
    """
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    total = sum(nbytes(t) for _, t in docs)
    target = EVAL_FRACTION * total
    splits = {"validation": [], "test": [], "train": []}
    filled = {"validation": 0, "test": 0}
    for i in idx:
        for name in ("validation", "test"):
            if filled[name] < target:
                splits[name].append(docs[i])
                filled[name] += nbytes(docs[i][1])
                break
        else:
            splits["train"].append(docs[i])
    for name in splits:
        splits[name].sort()
    return splits


LICENSES_MD = """\
# Bundled corpus: sources and licences

This folder holds a small (~{total_kb} kB) three-domain plain-text corpus used to
train and evaluate the tiny MoE models of `moemerge.zoo`. It was built by
`scripts/build_corpus.py` (seed {seed}) purely from Debian packages.

| domain | source | Debian package (version) | licence |
|---|---|---|---|
| `bible` | King James Version of the Bible, one document per chapter, printed by the `bible` CLI | `bible-kjv` ({v_bible}), `bible-kjv-text` ({v_bible_text}) | public domain (the KJV text; see `/usr/share/doc/bible-kjv-text/copyright`) |
| `python-code` | Python 3.11 standard-library modules `/usr/lib/python3.11/*.py`, one document per file, truncated to {max_code} characters | `libpython3.11-stdlib` ({v_stdlib}) | Python Software Foundation License Version 2 (see `/usr/share/doc/libpython3.11-stdlib/copyright`) |
| `python-docs` | Python 3.11 HTML documentation `/usr/share/doc/python3.11/html`, main text of each page extracted with `html.parser`, truncated to {max_docs} characters | `python3.11-doc` ({v_doc}) | Python Software Foundation License Version 2 (documentation; see `/usr/share/doc/python3.11-doc/copyright`) |

Documents were sampled at random (fixed seed) up to ~{budget_kb} kB per domain and
split **by document** into train / validation / test (~{eval_pct}% of each
domain's bytes to validation and to test, the rest to train).

## Contents

| split | documents | kB | per domain (documents / kB) |
|---|---|---|---|
{split_rows}

Files: `train.jsonl`, `validation.jsonl`, `test.jsonl`, one JSON object per line:
`{{"text": "...", "domain": "bible" | "python-code" | "python-docs"}}`.

## Rebuilding

```sh
python scripts/build_corpus.py
```

The script installs the Debian packages above with `apt-get` if they are
missing (needs root) and is deterministic for a given package version.
Different package versions (e.g. a later Debian security update of the Python
packages) may change the text slightly.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()

    versions = ensure_packages()
    readers = {"bible": read_bible, "python-code": read_python_code, "python-docs": read_python_docs}

    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for domain, reader in readers.items():
        # Seed per domain so adding a domain does not reshuffle the others.
        rng = random.Random(f"{args.seed}-{domain}")
        docs = reader()
        picked = sample_to_budget(docs, DOMAIN_BUDGET, rng)
        parts = split_domain(picked, rng)
        print(f"[build_corpus] {domain}: {len(docs)} documents available, {len(picked)} picked "
              f"({sum(nbytes(t) for _, t in picked) / 1e3:.0f} kB); "
              + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
        for name, items in parts.items():
            splits[name].extend({"text": t, "domain": domain} for _, t in items)

    args.out.mkdir(parents=True, exist_ok=True)
    rows, total = [], 0
    for name, recs in splits.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        kb = sum(nbytes(r["text"]) for r in recs) / 1e3
        total += kb
        per = []
        for d in readers:
            sub = [r for r in recs if r["domain"] == d]
            assert sub, f"domain {d} missing from split {name}"
            per.append(f"{d}: {len(sub)} / {sum(nbytes(r['text']) for r in sub) / 1e3:.0f}")
        rows.append(f"| {name} | {len(recs)} | {kb:.0f} | {'; '.join(per)} |")
        print(f"[build_corpus] wrote {name}.jsonl: {len(recs)} docs, {kb:.0f} kB")

    (args.out / "LICENSES.md").write_text(LICENSES_MD.format(
        total_kb=f"{total:.0f}", seed=args.seed,
        v_bible=versions["bible-kjv"], v_bible_text=versions["bible-kjv-text"],
        v_stdlib=versions["libpython3.11-stdlib"], v_doc=versions["python3.11-doc"],
        max_code=MAX_CODE_DOC, max_docs=MAX_DOCS_DOC, budget_kb=DOMAIN_BUDGET // 1000,
        eval_pct=int(EVAL_FRACTION * 100), split_rows="\n".join(rows),
    ), encoding="utf-8")
    print(f"[build_corpus] total {total:.0f} kB in {args.out}")


if __name__ == "__main__":
    main()
