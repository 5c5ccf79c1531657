"""Calico's label selector grammar, parsed into a small tree and evaluated on label maps.

Grammar (precedence from loose to tight: ``||``, ``&&``, ``!``)::

    expr    := and ( '||' and )*
    and     := unary ( '&&' unary )*
    unary   := '!' unary | '(' expr ')' | 'all()' | 'has(' key ')'
             | key '==' str | key '!=' str | key 'in' set | key 'not' 'in' set
    set     := '{' [ str ( ',' str )* ] '}'
    str     := '...' | "..."

As in Calico, ``k != 'v'`` and ``k not in {...}`` are true when ``k`` is absent, and the
empty selector means ``all()``.  Pure: no I/O.  Hostile input (deep nesting, huge text)
raises :class:`SelectorError` with one line, never a RecursionError.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_SELECTOR_LEN = 4096
MAX_DEPTH = 32
_KEY_RE = re.compile(r"[A-Za-z0-9_./-]+")
_TOKEN_RE = re.compile(
    r"\s*(?:(?P<op>==|!=|&&|\|\||[!(){},])|(?P<str>'[^']*'|\"[^\"]*\")|(?P<key>[A-Za-z0-9_./-]+))"
)


class SelectorError(ValueError):
    """A selector that does not parse; the message is one line and says where."""


class Selector:
    """A node of the selector tree: ``matches(labels)`` and ``str()`` (canonical text)."""

    prec = 3  # binding strength when printed: 1 ||, 2 &&, 3 anything tighter

    def matches(self, labels: Mapping[str, str]) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class All(Selector):
    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def __str__(self) -> str:
        return "all()"


@dataclass(frozen=True)
class Has(Selector):
    key: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class Eq(Selector):
    key: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) == self.value

    def __str__(self) -> str:
        return f"{self.key} == {_quote(self.value)}"


@dataclass(frozen=True)
class Ne(Selector):
    key: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) != self.value

    def __str__(self) -> str:
        return f"{self.key} != {_quote(self.value)}"


@dataclass(frozen=True)
class In(Selector):
    key: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels and labels[self.key] in self.values

    def __str__(self) -> str:
        return f"{self.key} in {_set(self.values)}"


@dataclass(frozen=True)
class NotIn(Selector):
    key: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) not in self.values

    def __str__(self) -> str:
        return f"{self.key} not in {_set(self.values)}"


@dataclass(frozen=True)
class Not(Selector):
    operand: Selector

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"!({inner})" if self.operand.prec < 3 or isinstance(
            self.operand, Eq | Ne | In | NotIn) else f"!{inner}"


@dataclass(frozen=True)
class And(Selector):
    left: Selector
    right: Selector
    prec = 2

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.left.matches(labels) and self.right.matches(labels)

    def __str__(self) -> str:
        return f"{_wrap(self.left, 2)} && {_wrap(self.right, 3)}"


@dataclass(frozen=True)
class Or(Selector):
    left: Selector
    right: Selector
    prec = 1

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.left.matches(labels) or self.right.matches(labels)

    def __str__(self) -> str:
        return f"{_wrap(self.left, 1)} || {_wrap(self.right, 2)}"


def _wrap(node: Selector, need: int) -> str:
    return str(node) if node.prec >= need else f"({node})"


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _set(values: frozenset[str]) -> str:
    return "{" + ", ".join(_quote(v) for v in sorted(values)) + "}"


def printable(value: str) -> bool:
    """Whether a literal can be written in a selector (it cannot hold both quote kinds)."""
    return not ("'" in value and '"' in value)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._lex(text)
        self.i = 0
        self.depth = 0

    @staticmethod
    def _lex(text: str) -> list[tuple[str, str, int]]:
        tokens, pos = [], 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                return tokens
            m = _TOKEN_RE.match(text, pos)
            if m is None or m.end() == pos:
                raise SelectorError(f"unexpected {text[pos:pos + 10]!r} at column {pos + 1}")
            kind = m.lastgroup or ""
            tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()

    def peek(self, ahead: int = 0) -> tuple[str, str, int] | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def _where(self) -> str:
        tok = self.peek()
        return "at the end" if tok is None else f"at column {tok[2] + 1} ({tok[1][:20]!r})"

    def expect(self, value: str) -> None:
        tok = self.peek()
        if tok is None or tok[0] == "str" or tok[1] != value:
            raise SelectorError(f"expected {value!r} {self._where()}")
        self.i += 1

    def accept(self, value: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] != "str" and tok[1] == value:
            self.i += 1
            return True
        return False

    def parse(self) -> Selector:
        if not self.tokens:
            return All()
        node = self.expr()
        if self.peek() is not None:
            raise SelectorError(f"unexpected {self._where()}")
        return node

    def expr(self) -> Selector:
        node = self.conj()
        while self.accept("||"):
            node = Or(node, self.conj())
        return node

    def conj(self) -> Selector:
        node = self.unary()
        while self.accept("&&"):
            node = And(node, self.unary())
        return node

    def unary(self) -> Selector:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SelectorError(f"nested more than {MAX_DEPTH} deep")
        try:
            return self._unary()
        finally:
            self.depth -= 1

    def _unary(self) -> Selector:
        if self.accept("!"):
            return Not(self.unary())
        if self.accept("("):
            node = self.expr()
            self.expect(")")
            return node
        tok = self.peek()
        if tok is None or tok[0] != "key":
            raise SelectorError(f"expected a label key, has(), all(), '!' or '(' {self._where()}")
        nxt = self.peek(1)
        if tok[1] in ("has", "all") and nxt is not None and nxt[1] == "(" and nxt[0] == "op":
            self.i += 2
            if tok[1] == "all":
                self.expect(")")
                return All()
            key = self.key()
            self.expect(")")
            return Has(key)
        key = self.key()
        if self.accept("=="):
            return Eq(key, self.string())
        if self.accept("!="):
            return Ne(key, self.string())
        if self.accept("in"):
            return In(key, self.values())
        if self.accept("not"):
            self.expect("in")
            return NotIn(key, self.values())
        raise SelectorError(f"expected ==, !=, in or not in after {key!r} {self._where()}")

    def key(self) -> str:
        tok = self.peek()
        if tok is None or tok[0] != "key":
            raise SelectorError(f"expected a label key {self._where()}")
        self.i += 1
        return tok[1]

    def string(self) -> str:
        tok = self.peek()
        if tok is None or tok[0] != "str":
            raise SelectorError(f"expected a quoted value {self._where()}")
        self.i += 1
        return tok[1][1:-1]

    def values(self) -> frozenset[str]:
        self.expect("{")
        out: set[str] = set()
        if self.accept("}"):
            return frozenset()
        out.add(self.string())
        while self.accept(","):
            out.add(self.string())
        self.expect("}")
        return frozenset(out)


def parse_selector(text: str) -> Selector:
    """The tree of a selector; :class:`SelectorError` (one line) when it does not parse."""
    if not isinstance(text, str):
        raise SelectorError(f"a selector is a string, not {type(text).__name__}")
    if len(text) > MAX_SELECTOR_LEN:
        raise SelectorError(f"longer than {MAX_SELECTOR_LEN} characters")
    return _Parser(text).parse()


def valid_key(key: str) -> bool:
    """Whether ``key`` can be a label key in a selector."""
    return bool(_KEY_RE.fullmatch(key))
