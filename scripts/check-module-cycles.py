#!/usr/bin/env python3
"""Fails when the top-level modules under src/ import each other in a cycle.

Every `crate::NAME` path (in `use` items, `use crate::{a::X, b}` groups and
paths in code) of a file under src/NAME(.rs|/) is an edge NAME -> other. The
graph must be acyclic: a module may only depend on modules "below" it, which is
what docs/architecture.md draws. `lib.rs` and `main.rs` are the roots and are
not part of the graph. Comments and string literals are ignored.

Usage: scripts/check-module-cycles.py [SRC_DIR]   (default: src next to this script)
Exit 0 with the module order printed, 1 with each cycle printed.
"""

import pathlib
import re
import sys

ROOTS = {"lib", "main"}
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def strip_comments_and_strings(text: str) -> str:
    """Blanks out comments, string and char literals (keeps line structure)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not text[i - 1].isalnum()):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def group_heads(text: str, start: int) -> list[str]:
    """The first identifier of each item of the `{...}` group opening at `start`."""
    heads, depth, i, expect_head = [], 0, start, False
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            expect_head = depth == 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        elif c == "," and depth == 1:
            expect_head = True
        elif expect_head and not c.isspace():
            m = IDENT.match(text, i)
            if m:
                heads.append(m.group(0))
                i = m.end()
                expect_head = False
                continue
            expect_head = False
        i += 1
    return heads


def references(text: str) -> set[str]:
    """Top-level module names this source refers to through `crate::`."""
    refs = set()
    for m in re.finditer(r"\bcrate\s*::\s*", text):
        rest = m.end()
        if rest < len(text) and text[rest] == "{":
            refs.update(group_heads(text, rest))
        else:
            ident = IDENT.match(text, rest)
            if ident:
                refs.add(ident.group(0))
    return refs


def module_of(src: pathlib.Path, path: pathlib.Path) -> str:
    first = path.relative_to(src).parts[0]
    return first.removesuffix(".rs")


def graph(src: pathlib.Path) -> dict[str, set[str]]:
    modules = {module_of(src, p) for p in src.rglob("*.rs")} - ROOTS
    edges = {m: set() for m in modules}
    for path in sorted(src.rglob("*.rs")):
        owner = module_of(src, path)
        if owner in ROOTS:
            continue
        text = strip_comments_and_strings(path.read_text(encoding="utf-8"))
        edges[owner] |= {r for r in references(text) if r in modules and r != owner}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules by depth: layer 0 depends on nothing in the crate."""
    depth: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in depth:
            depth[v] = 0
            depth[v] = 1 + max((d(w) for w in edges[v]), default=-1)
        return depth[v]

    for v in edges:
        d(v)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for v, k in depth.items():
        out[k].append(v)
    return [sorted(layer) for layer in out]


def main() -> int:
    src = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent / "src"
    edges = graph(src)
    if not edges:
        print(f"check-module-cycles: no modules found under {src}", file=sys.stderr)
        return 1
    found = cycles(edges)
    if found:
        for component in found:
            inner = {m: sorted(edges[m] & set(component)) for m in component}
            print("module cycle: " + ", ".join(f"{m} -> {{{', '.join(t)}}}" for m, t in inner.items()))
        return 1
    for k, layer in enumerate(layers(edges)):
        print(f"layer {k}: {' '.join(layer)}")
    print(f"check-module-cycles: {len(edges)} modules, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
