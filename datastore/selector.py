"""The label-selector languages, parsed once into a matcher.

Two syntaxes are accepted wherever a selector string is: Kubernetes' (`env=prod,tier!=web,
zone in (a,b),!legacy,gpu`, what `kubectl -l` takes) and Calico's, below. A text that is
a well-formed Kubernetes selector is read as one (the two grammars do not overlap: Calico
quotes its values and spells presence `has(k)`); anything else is parsed as Calico's.

Used by IPPool.nodeSelector, BGPPeer.nodeSelector/peerSelector and anything else that
picks resources by their labels. Grammar, loosest binding first::

    expr    := and ( "||" and )*
    and     := unary ( "&&" unary )*
    unary   := "!" unary | "(" expr ")" | term
    term    := "all()" | "has(" KEY ")"
             | KEY ("==" | "!=") STR
             | KEY ["not"] "in" "{" [STR ("," STR)*] "}"
             | KEY ("contains" | "starts with" | "ends with") STR

The empty selector means `all()`. As in Calico (and Kubernetes' NotIn), a negative
test on a label matches an object that does not have the label at all: `a != "x"`,
`a not in {"x"}` and `!has(a)` are all true for an object without `a`.

`str(selector)` is a canonical form: parsing it gives an equal selector, so it can be
stored, compared and used as a dict key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from tortie.errors import ValidationError

Labels = Mapping[str, str]


class Selector:
    """A parsed selector; `matches(labels)` is the only thing callers need."""

    def matches(self, labels: Labels) -> bool:
        raise NotImplementedError

    def __call__(self, labels: Labels) -> bool:
        return self.matches(labels)


@dataclass(frozen=True)
class All(Selector):
    def matches(self, labels: Labels) -> bool:
        return True

    def __str__(self) -> str:
        return "all()"


ALL = All()


@dataclass(frozen=True)
class Has(Selector):
    key: str

    def matches(self, labels: Labels) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class Equals(Selector):
    key: str
    value: str

    def matches(self, labels: Labels) -> bool:
        return labels.get(self.key) == self.value

    def __str__(self) -> str:
        return f"{self.key} == {_quote(self.value)}"


@dataclass(frozen=True)
class In(Selector):
    key: str
    values: frozenset[str]

    def matches(self, labels: Labels) -> bool:
        return self.key in labels and labels[self.key] in self.values

    def __str__(self) -> str:
        return f"{self.key} in {{{', '.join(_quote(v) for v in sorted(self.values))}}}"


_STRING_OPS = {
    "contains": lambda have, want: want in have,
    "starts with": str.startswith,
    "ends with": str.endswith,
}


@dataclass(frozen=True)
class Match(Selector):
    """`key contains "v"`, `key starts with "v"`, `key ends with "v"`."""

    key: str
    op: str  # one of _STRING_OPS
    value: str

    def matches(self, labels: Labels) -> bool:
        return self.key in labels and _STRING_OPS[self.op](labels[self.key], self.value)

    def __str__(self) -> str:
        return f"{self.key} {self.op} {_quote(self.value)}"


@dataclass(frozen=True)
class Not(Selector):
    inner: Selector

    def matches(self, labels: Labels) -> bool:
        return not self.inner.matches(labels)

    def __str__(self) -> str:
        # `!=` and `not in` are spelled as themselves so they read naturally.
        if isinstance(self.inner, Equals):
            return f"{self.inner.key} != {_quote(self.inner.value)}"
        if isinstance(self.inner, In):
            return str(self.inner).replace(" in {", " not in {", 1)
        if isinstance(self.inner, (And, Or)):
            return f"!({self.inner})"
        return f"!{self.inner}"


@dataclass(frozen=True)
class And(Selector):
    parts: tuple[Selector, ...]

    def matches(self, labels: Labels) -> bool:
        return all(p.matches(labels) for p in self.parts)

    def __str__(self) -> str:
        return " && ".join(f"({p})" if isinstance(p, Or) else str(p) for p in self.parts)


@dataclass(frozen=True)
class Or(Selector):
    parts: tuple[Selector, ...]

    def matches(self, labels: Labels) -> bool:
        return any(p.matches(labels) for p in self.parts)

    def __str__(self) -> str:
        return " || ".join(str(p) for p in self.parts)


def _quote(value: str) -> str:
    # The language has no escapes, so pick the quote the value does not contain.
    return f'"{value}"' if '"' not in value else f"'{value}'"


# --- parser -------------------------------------------------------------------------

# Kubernetes label keys: optional DNS prefix and "/", then name characters.
_KEY = r"[A-Za-z0-9_][A-Za-z0-9_./-]*"
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"[^"]*"|'[^']*')
      | (?P<op>==|!=|&&|\|\||[!(){},])
      | (?P<word>starts\s+with|ends\s+with|not\s+in\b|all\(\s*\)|has\(\s*""" + _KEY + r"""\s*\)|""" + _KEY + r""")
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Tok:
    kind: str  # "str" | "op" | "word" | "end"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            toks.append(_Tok("end", "", pos))
            return toks
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValidationError(f"selector {text!r}: unexpected character at {pos}: {text[pos:pos + 10]!r}")
        kind = m.lastgroup or "word"
        tok = m.group(kind)
        if kind == "word":
            tok = " ".join(tok.split())  # "starts   with" -> "starts with"
        toks.append(_Tok(kind, tok, m.start(kind)))
        pos = m.end()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def error(self, what: str) -> ValidationError:
        tok = self.toks[self.i]
        where = f"at {tok.pos} ({tok.text!r})" if tok.kind != "end" else "at the end"
        return ValidationError(f"selector {self.text!r}: {what} {where}")

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self, kind: str | None = None, text: str | None = None) -> _Tok | None:
        tok = self.toks[self.i]
        if (kind is None or tok.kind == kind) and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def expect(self, kind: str, text: str | None = None, what: str = "") -> _Tok:
        tok = self.take(kind, text)
        if tok is None:
            raise self.error(f"expected {what or text or kind}")
        return tok

    def parse(self) -> Selector:
        if self.peek().kind == "end":
            return All()
        sel = self.expr()
        if self.peek().kind != "end":
            raise self.error("unexpected token")
        return sel

    def expr(self) -> Selector:
        parts = [self.conj()]
        while self.take("op", "||"):
            parts.append(self.conj())
        return _flatten(Or, parts)

    def conj(self) -> Selector:
        parts = [self.unary()]
        while self.take("op", "&&"):
            parts.append(self.unary())
        return _flatten(And, parts)

    def unary(self) -> Selector:
        if self.take("op", "!"):
            inner = self.unary()
            return inner.inner if isinstance(inner, Not) else Not(inner)
        if self.take("op", "("):
            inner = self.expr()
            self.expect("op", ")")
            return inner
        return self.term()

    def term(self) -> Selector:
        tok = self.expect("word", what="a label name, has(...) or all()")
        if tok.text.startswith("all("):
            return All()
        if tok.text.startswith("has("):
            return Has(tok.text[4:-1].strip())
        key = tok.text
        if key in ("in", "not in", "starts with", "ends with", "contains"):
            raise self.error("expected a label name")
        if self.take("op", "=="):
            return Equals(key, self.string())
        if self.take("op", "!="):
            return Not(Equals(key, self.string()))
        if self.take("word", "in"):
            return In(key, self.string_set())
        if self.take("word", "not in"):
            return Not(In(key, self.string_set()))
        for op in _STRING_OPS:
            if self.take("word", op):
                return Match(key, op, self.string())
        raise self.error(f"expected an operator after {key!r}")

    def string(self) -> str:
        return self.expect("str", what="a quoted string").text[1:-1]

    def string_set(self) -> frozenset[str]:
        self.expect("op", "{")
        values: list[str] = []
        if not self.take("op", "}"):
            values.append(self.string())
            while self.take("op", ","):
                values.append(self.string())
            self.expect("op", "}")
        return frozenset(values)


def _flatten(cls: type[And] | type[Or], parts: list[Selector]) -> Selector:
    if len(parts) == 1:
        return parts[0]
    flat: list[Selector] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, cls) else (p,))
    return cls(tuple(flat))


_K8S_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_K8S_KEY = rf"(?:{_K8S_NAME}(?:\.{_K8S_NAME})*/)?{_K8S_NAME}"
# Empty values (`role=`), legal in Kubernetes, are left to Calico's parser, which refuses
# them: a dangling operator is far more often a typo than a test for an empty label.
_K8S_VALUE = _K8S_NAME
_K8S_REQ = re.compile(
    rf"""\s*(?:
        (?P<not>!)\s*(?P<nkey>{_K8S_KEY})
      | (?P<key>{_K8S_KEY})\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>{_K8S_VALUE})
          | (?P<set>in|notin)\s*\(\s*(?P<values>{_K8S_VALUE}(?:\s*,\s*{_K8S_VALUE})*)\s*\)
        )?
    )\s*""",
    re.VERBOSE,
)


def _k8s_to_calico(text: str) -> str | None:
    """Kubernetes selector syntax translated to Calico's, or None if it is not that syntax."""
    out, pos = [], 0
    while True:
        m = _K8S_REQ.match(text, pos)
        if not m or m.end() == m.start():
            return None
        if m["not"]:
            out.append(f"!has({m['nkey']})")
        elif m["op"]:
            out.append(f'{m["key"]} {"!=" if m["op"] == "!=" else "=="} "{m["value"]}"')
        elif m["set"]:
            values = ", ".join(f'"{v.strip()}"' for v in m["values"].split(","))
            out.append(f'{m["key"]} {"in" if m["set"] == "in" else "not in"} {{{values}}}')
        else:
            out.append(f"has({m['key']})")
        pos = m.end()
        if pos == len(text):
            return " && ".join(out)
        if text[pos] != ",":
            return None
        pos += 1


@lru_cache(maxsize=4096)
def parse(text: str | None) -> Selector:
    """Parse a selector in either syntax; raises ValidationError saying where it went wrong."""
    text = text or ""
    if text.strip():
        translated = _k8s_to_calico(text)
        if translated is not None:
            return _Parser(translated).parse()
    return _Parser(text).parse()


def validate(text: str | None, field: str) -> str:
    """Check a selector from a resource; the error names the resource field."""
    try:
        parse(text)
    except ValidationError as exc:
        raise ValidationError(exc.message, field=field) from None
    return text or ""


# --- Kubernetes LabelSelector ---------------------------------------------------------

_K8S_OPS = ("In", "NotIn", "Exists", "DoesNotExist")


def from_k8s(label_selector: Mapping | None, field: str = "selector") -> Selector:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) as a Selector.

    `{}` (and None) select everything, as they do for a NetworkPolicy's podSelector.
    """
    if label_selector is None:
        return All()
    if not isinstance(label_selector, Mapping):
        raise ValidationError("must be a label selector object", field=field)
    unknown = set(label_selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValidationError(f"unknown field(s) {sorted(unknown)}", field=field)
    parts: list[Selector] = []
    match_labels = label_selector.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise ValidationError("must be a map of label to value", field=f"{field}.matchLabels")
    for key, value in sorted(match_labels.items()):
        parts.append(Equals(str(key), str(value)))
    exprs = label_selector.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise ValidationError("must be a list", field=f"{field}.matchExpressions")
    for i, e in enumerate(exprs):
        where = f"{field}.matchExpressions[{i}]"
        if not isinstance(e, Mapping) or not isinstance(e.get("key"), str) or not e["key"]:
            raise ValidationError("needs a key", field=where)
        op, values = e.get("operator"), e.get("values") or []
        if op not in _K8S_OPS:
            raise ValidationError(f"operator must be one of {', '.join(_K8S_OPS)}", field=f"{where}.operator")
        if not isinstance(values, list):
            raise ValidationError("must be a list of strings", field=f"{where}.values")
        if op in ("In", "NotIn") and not values:
            raise ValidationError(f"{op} needs at least one value", field=f"{where}.values")
        if op in ("Exists", "DoesNotExist") and values:
            raise ValidationError(f"{op} takes no values", field=f"{where}.values")
        test: Selector = In(e["key"], frozenset(map(str, values))) if op in ("In", "NotIn") else Has(e["key"])
        parts.append(Not(test) if op in ("NotIn", "DoesNotExist") else test)
    if not parts:
        return All()
    return _flatten(And, parts)


__all__ = ["Selector", "from_k8s", "parse", "validate"]
