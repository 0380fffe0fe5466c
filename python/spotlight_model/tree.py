"""Category tree: read from a JSON file, flattened into segment specs.

Tree file format (see python/trees/fashion_mnist.json and python/README.md):

    {
      "name": "my-model",                      # default package name
      "categories": ["cat", "dog", ...],       # index = label id in the dataset
      "reason": "why the tree looks like this",
      "segment_defaults": {"top_channels": [48, 48], "nested_channels": [32, 32]},
      "tree": [                                # top-level groups
        {"id": "animals", "channels": [48, 48],
         "children": [{"id": "pets", "children": ["cat", "dog"]}, "horse"]}
      ]
    }

A group's children are either groups (objects) or category names (strings: the
group's *direct categories*). Nested segment ids are "parent.child".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ID_RE = re.compile(r"^[a-z0-9_-]+$")


@dataclass
class SegmentSpec:
    id: str
    parent: str | None
    children: list[str]
    direct_categories: list[int]
    categories: list[int] = field(default_factory=list)  # all under this segment, sorted
    channels: list[int] = field(default_factory=list)


@dataclass
class CategoryTree:
    name: str
    categories: list[str]
    segments: list[SegmentSpec]  # pre-order: parents before children
    reason: str = ""
    source: dict = field(default_factory=dict)

    def by_id(self) -> dict[str, SegmentSpec]:
        return {s.id: s for s in self.segments}

    def top_level(self) -> list[SegmentSpec]:
        return [s for s in self.segments if s.parent is None]

    def leaves(self) -> list[SegmentSpec]:
        return [s for s in self.segments if not s.children]

    def owner_of(self) -> dict[int, str]:
        """category index -> id of the segment that scores it directly."""
        out = {}
        for s in self.segments:
            for c in s.direct_categories:
                out[c] = s.id
        return out

    def needed_segments(self, cats) -> list[str]:
        """Segments on the paths from the backbone to the given categories (manifest order)."""
        by = self.by_id()
        own = self.owner_of()
        need = set()
        for c in cats:
            sid = own[int(c)]
            while sid is not None:
                need.add(sid)
                sid = by[sid].parent
        return [s.id for s in self.segments if s.id in need]

    def top_group_of(self) -> dict[int, str]:
        """category index -> id of its top-level segment."""
        by = self.by_id()
        out = {}
        for c, sid in self.owner_of().items():
            while by[sid].parent is not None:
                sid = by[sid].parent
            out[c] = sid
        return out


def load_tree(path: str | Path) -> CategoryTree:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return parse_tree(data)


def parse_tree(data: dict) -> CategoryTree:
    cats = list(data["categories"])
    if len(set(cats)) != len(cats):
        raise ValueError("duplicate category names")
    index = {c: i for i, c in enumerate(cats)}
    defaults = data.get("segment_defaults", {})
    top_ch = list(defaults.get("top_channels", [48, 48]))
    nested_ch = list(defaults.get("nested_channels", [32, 32]))
    segments: list[SegmentSpec] = []
    seen_cats: set[int] = set()

    def visit(node: dict, parent: SegmentSpec | None) -> SegmentSpec:
        local = node["id"]
        if not ID_RE.match(local):
            raise ValueError(f"bad group id {local!r}: use [a-z0-9_-]+")
        sid = local if parent is None else f"{parent.id}.{local}"
        ch = list(node.get("channels", top_ch if parent is None else nested_ch))
        if not ch or any(int(c) <= 0 for c in ch):
            raise ValueError(f"segment {sid}: channels must be a non-empty list of positive ints")
        spec = SegmentSpec(id=sid, parent=None if parent is None else parent.id,
                           children=[], direct_categories=[], channels=[int(c) for c in ch])
        segments.append(spec)
        for child in node.get("children", []):
            if isinstance(child, str):
                if child not in index:
                    raise ValueError(f"segment {sid}: unknown category {child!r}")
                ci = index[child]
                if ci in seen_cats:
                    raise ValueError(f"category {child!r} appears twice in the tree")
                seen_cats.add(ci)
                spec.direct_categories.append(ci)
            else:
                sub = visit(child, spec)
                spec.children.append(sub.id)
        if not spec.children and not spec.direct_categories:
            raise ValueError(f"segment {sid} has no children and no categories")
        return spec

    for node in data["tree"]:
        visit(node, None)
    if len({s.id for s in segments}) != len(segments):
        raise ValueError("duplicate segment ids")
    missing = set(range(len(cats))) - seen_cats
    if missing:
        raise ValueError(f"categories not in the tree: {[cats[i] for i in sorted(missing)]}")
    by = {s.id: s for s in segments}
    for s in reversed(segments):  # children come after parents
        allc = set(s.direct_categories)
        for ch in s.children:
            allc |= set(by[ch].categories)
        s.categories = sorted(allc)
    return CategoryTree(name=data.get("name", "model"), categories=cats, segments=segments,
                        reason=data.get("reason", ""), source=data)
