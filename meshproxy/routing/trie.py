"""Path index of one virtual host: narrows the routes a request can match, before any other condition.

Istio's rule is first match in declaration order. The index never changes the
answer, only how many routes are looked at:

* exact paths: a dict from path to the sorted route indexes that name it;
* prefix paths: a radix trie over bytes (edges are byte strings, keyed by their
  first byte), each node holding the sorted indexes of routes whose prefix ends
  there. Walking the request path visits every stored prefix of it, so the cost
  is bounded by the path's length, not by the number of routes;
* `ignoreUriCase` routes go into a second dict and trie over lower-cased keys,
  looked up with the lower-cased path (ASCII, as Envoy);
* routes without a uri condition, or with a regex one, are candidates always.

Each source yields sorted indexes; the answer is the lowest index, over all
sources, whose remaining conditions (`checks[i]`: the match without its uri, or
None when nothing remains) hold. Each source is scanned in ascending order and
stops at its first hit or at the best index found so far, so no candidate list
is built per request and no route above the answer is tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from sys import maxsize
from typing import Final

from .match import MatchInput, RouteMatch

NO_ROUTE: Final = maxsize


class _Node:
    """A radix-trie node: `edges` maps the first byte of an edge to (edge bytes, their length, child)."""

    __slots__ = ("edges", "ids", "low", "floor")

    def __init__(self) -> None:
        self.edges: dict[int, tuple[bytes, int, _Node]] = {}
        self.ids: list[int] | tuple[int, ...] = []  # a list while building, a sorted tuple once sealed
        self.low = NO_ROUTE  # ids[0]: the lowest route index stored here
        self.floor = NO_ROUTE  # lowest route index in this subtree: the walk stops once it cannot improve


class PrefixTrie:
    __slots__ = ("root", "size")

    def __init__(self) -> None:
        self.root = _Node()
        self.size = 0

    def insert(self, key: bytes, route_id: int) -> None:
        node, pos, end = self.root, 0, len(key)
        while pos < end:
            edge = node.edges.get(key[pos])
            if edge is None:
                leaf = _Node()
                node.edges[key[pos]] = (key[pos:], end - pos, leaf)
                node = leaf
                break
            label, length, child = edge
            common = _common_length(label, key, pos)
            if common < length:  # split the edge where the key leaves it
                middle = _Node()
                middle.edges[label[common]] = (label[common:], length - common, child)
                node.edges[key[pos]] = (label[:common], common, middle)
                child = middle
            node, pos = child, pos + common
        assert isinstance(node.ids, list), "insert after seal"
        node.ids.append(route_id)
        self.size += 1

    def seal(self) -> _Node:
        """Freeze for matching: sorted id tuples, `low` and `floor` on every node (iteratively: nested
        prefixes can make the trie deep). Returns the root."""
        order, stack = [], [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(child for _, _, child in node.edges.values())
        for node in reversed(order):  # children before parents
            node.ids = tuple(sorted(node.ids))
            node.low = node.ids[0] if node.ids else NO_ROUTE
            node.floor = min([node.low, *(child.floor for _, _, child in node.edges.values())])
        return self.root

    def prefixes_of(self, path: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
        """(stored prefix, route indexes) for every stored prefix of `path`, shortest first (for tests and
        explanations; the hot path walks inline in `_walk`)."""
        out = []
        node, pos, end = self.root, 0, len(path)
        if node.ids:
            out.append((b"", tuple(sorted(node.ids))))
        while pos < end:
            edge = node.edges.get(path[pos])
            if edge is None or not path.startswith(edge[0], pos):
                break
            pos += edge[1]
            node = edge[2]
            if node.ids:
                out.append((path[:pos], tuple(sorted(node.ids))))
        return out


def _common_length(label: bytes, key: bytes, pos: int) -> int:
    if key.startswith(label, pos):
        return len(label)
    limit = min(len(label), len(key) - pos)
    i = 0
    while i < limit and label[i] == key[pos + i]:
        i += 1
    return i


def _lowest(ids: Sequence[int], checks: Sequence[RouteMatch | None], req: MatchInput, port: int, best: int) -> int:
    """The first of `ids` (ascending) below `best` whose remaining conditions hold, else `best`."""
    for i in ids:
        if i >= best:
            return best
        check = checks[i]
        if check is None or check.matches(req, port):
            return i
    return best


class PathIndex:
    """Compiled from a virtual host's routes; `first(req, port)` is the index of the route that wins."""

    __slots__ = ("checks", "exact", "exact_ci", "prefix", "prefix_ci", "always", "lower")

    def __init__(self, matches: Sequence[RouteMatch]) -> None:
        checks: list[RouteMatch | None] = []
        exact: dict[bytes, list[int]] = {}
        exact_ci: dict[bytes, list[int]] = {}
        prefix, prefix_ci = PrefixTrie(), PrefixTrie()
        always: list[int] = []
        for i, match in enumerate(matches):
            path = match.path
            if path is None or path.kind not in ("exact", "prefix"):
                always.append(i)
                checks.append(None if match.catch_all else match)
                continue
            checks.append(match.without_path())
            if path.kind == "exact":
                (exact_ci if path.ignore_case else exact).setdefault(path.value, []).append(i)
            else:
                (prefix_ci if path.ignore_case else prefix).insert(path.value, i)
        self.checks = tuple(checks)
        self.exact = {k: tuple(v) for k, v in exact.items()}
        self.exact_ci = {k: tuple(v) for k, v in exact_ci.items()}
        self.prefix = prefix.seal() if prefix.size else None
        self.prefix_ci = prefix_ci.seal() if prefix_ci.size else None
        self.always = tuple(always)
        self.lower = bool(self.exact_ci) or self.prefix_ci is not None

    def first(self, req: MatchInput, port: int) -> int:
        """Lowest route index whose match holds, or NO_ROUTE."""
        checks = self.checks
        best = NO_ROUTE
        path = req.path
        ids = self.exact.get(path)
        if ids is not None:
            best = _lowest(ids, checks, req, port, best)
        node = self.prefix
        if node is not None:
            best = _walk(node, path, checks, req, port, best)
        if self.lower:
            lowered = path.lower()
            ids = self.exact_ci.get(lowered)
            if ids is not None:
                best = _lowest(ids, checks, req, port, best)
            node = self.prefix_ci
            if node is not None:
                best = _walk(node, lowered, checks, req, port, best)
        ids = self.always
        if ids and ids[0] < best:
            best = _lowest(ids, checks, req, port, best)
        return best


def _walk(node: _Node, path: bytes, checks: Sequence[RouteMatch | None], req: MatchInput, port: int,
          best: int) -> int:
    """Visit the stored prefixes of `path` along the trie; stop where no lower index can be found below."""
    if node.floor >= best:
        return best
    if node.low < best:
        best = _lowest(node.ids, checks, req, port, best)
    pos, end = 0, len(path)
    while pos < end:
        edge = node.edges.get(path[pos])  # the first byte is the key: one-byte edges need no compare
        if edge is None:
            break
        label, length, node = edge
        if node.floor >= best or (length > 1 and not path.startswith(label, pos)):
            break
        pos += length
        if node.low < best:
            best = _lowest(node.ids, checks, req, port, best)
    return best
