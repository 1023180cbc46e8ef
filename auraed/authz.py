"""Per-RPC authorization: which SPIFFE IDs may call which methods.

A policy is two lists of named rules, `deny` and `allow`. Each rule names
principals and methods; it applies to a call when one of each matches. A call
is denied if any deny rule applies, else allowed if any allow rule applies,
else denied. Health checks and reflection are allowed to every identified
peer unless a deny rule says otherwise: probes and tools need them before
anything else, and they reveal nothing about workloads.

Principals:  spiffe://td/path      that ID exactly
             spiffe://td/team/*    every ID below /team (not /team itself)
             spiffe://td           every ID in the trust domain
Methods:     /pkg.Service/Method   that method
             /pkg.Service/*        every method of the service
             *                     every method

The policy file is YAML or JSON; see docs/security.md. Loading checks every
pattern and that every method named exists, so a typo fails the daemon's
start instead of silently matching nothing. No gRPC imports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from auraed.identity import SpiffeId

# Allowed to every identified peer unless a deny rule names them.
BASELINE_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
BASELINE_RULE = "baseline"
DECISION_CACHE = 4096

_METHOD = re.compile(r"/([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)/(\*|[A-Za-z_][A-Za-z0-9_]*)")
_RULE_KEYS = frozenset({"name", "principals", "methods"})
_POLICY_KEYS = ("deny", "allow")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True)
class PrincipalPattern:
    text: str
    trust_domain: str
    path: str  # the exact path, or for a prefix its path with a trailing "/"
    kind: Literal["exact", "prefix", "trust_domain"]

    @classmethod
    def parse(cls, text: str) -> PrincipalPattern:
        prefix = text.endswith("/*")
        try:
            spiffe_id = SpiffeId.parse(text[:-2] if prefix else text)
        except ValueError as error:
            raise ValueError(f"principal {text!r}: {error}") from None
        if prefix:
            if not spiffe_id.path:  # spiffe://td/* is the whole trust domain
                return cls(text, spiffe_id.trust_domain, "", "trust_domain")
            return cls(text, spiffe_id.trust_domain, spiffe_id.path + "/", "prefix")
        if not spiffe_id.path:
            return cls(text, spiffe_id.trust_domain, "", "trust_domain")
        return cls(text, spiffe_id.trust_domain, spiffe_id.path, "exact")

    def matches(self, peer: SpiffeId) -> bool:
        if peer.trust_domain != self.trust_domain:
            return False
        if self.kind == "exact":
            return peer.path == self.path
        if self.kind == "prefix":
            return peer.path.startswith(self.path)
        return True


@dataclass(frozen=True)
class MethodPattern:
    text: str

    @classmethod
    def parse(cls, text: str, known_methods: Collection[str]) -> MethodPattern:
        if text == "*":
            return cls(text)
        match = _METHOD.fullmatch(text)
        if match is None:
            raise ValueError(
                f"method {text!r} is not '*', '/package.Service/Method' or '/package.Service/*'"
            )
        service, method = match.groups()
        if method == "*":
            if not any(known.startswith(f"/{service}/") for known in known_methods):
                raise ValueError(f"method {text!r}: this daemon serves no service {service}")
        elif text not in known_methods:
            raise ValueError(f"method {text!r}: this daemon serves no such method")
        return cls(text)

    def matches(self, method: str) -> bool:
        if self.text == "*":
            return True
        if self.text.endswith("/*"):
            return method.startswith(self.text[:-1])
        return method == self.text


@dataclass(frozen=True)
class Rule:
    name: str
    principals: tuple[PrincipalPattern, ...]
    methods: tuple[MethodPattern, ...]

    def applies(self, peer: SpiffeId, method: str) -> bool:
        return any(p.matches(peer) for p in self.principals) and any(
            m.matches(method) for m in self.methods
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None  # the rule that decided; None when no rule applied (denied)
    reason: str


@dataclass(frozen=True)
class Policy:
    deny: tuple[Rule, ...]
    allow: tuple[Rule, ...]

    def __post_init__(self) -> None:
        # Peers call the same few methods over and over: remember each answer (a policy
        # never changes once loaded).
        object.__setattr__(self, "decide", lru_cache(maxsize=DECISION_CACHE)(self.decide))

    def decide(self, peer: SpiffeId, method: str) -> Decision:
        """Whether `peer` may call `method`, and which rule says so."""
        for rule in self.deny:
            if rule.applies(peer, method):
                return Decision(False, rule.name, f"{peer} may not call {method}: "
                                                  f"denied by rule {rule.name!r}")
        if _service_of(method) in BASELINE_SERVICES:
            return Decision(True, BASELINE_RULE, f"{method} is open to every identified peer")
        for rule in self.allow:
            if rule.applies(peer, method):
                return Decision(True, rule.name, f"allowed by rule {rule.name!r}")
        return Decision(False, None, f"{peer} may not call {method}: no rule allows it")


def load_policy(path: Path, known_methods: Collection[str]) -> Policy:
    """Read and check a policy file: JSON if it ends in .json, else YAML."""
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(f"{path}: cannot read it: {error.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    import yaml  # only with a policy: ~15 modules a daemon (or a guest's) start would load for none

    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{error}") from None
    return parse_policy(document, known_methods, source=str(path))


def parse_policy(document: object, known_methods: Collection[str], *,
                 source: str = "policy") -> Policy:
    """A Policy from a parsed document ({"deny": [...], "allow": [...]})."""
    if not isinstance(document, dict) or not document:
        raise PolicyError(f"{source}: expected a mapping with 'deny' and/or 'allow' rule lists "
                          "(write 'allow: []' to deny everything)")
    unknown = sorted(set(map(str, document)) - set(_POLICY_KEYS))
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                          "a policy has 'deny' and 'allow'")
    names: set[str] = set()
    lists: dict[str, tuple[Rule, ...]] = {}
    for kind in _POLICY_KEYS:
        entries = document.get(kind)
        if entries is None:  # "allow:" with nothing after it
            entries = []
        if not isinstance(entries, list):
            raise PolicyError(f"{source}: '{kind}' must be a list of rules")
        rules = []
        for index, entry in enumerate(entries):
            rule = _parse_rule(entry, known_methods, where=f"{source}: {kind} rule",
                               index=index + 1)
            if rule.name in names:
                raise PolicyError(f"{source}: {kind} rule {rule.name!r}: the name is used twice")
            names.add(rule.name)
            rules.append(rule)
        lists[kind] = tuple(rules)
    return Policy(deny=lists["deny"], allow=lists["allow"])


def _parse_rule(entry: object, known_methods: Collection[str], *, where: str,
                index: int) -> Rule:
    """One rule; `where` ("policy.yaml: allow rule") starts every error message."""
    if not isinstance(entry, dict):
        raise PolicyError(f"{where} #{index}: expected a mapping with name, principals and "
                          "methods")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where} #{index}: every rule needs a 'name'")
    where = f"{where} {name!r}"
    unknown = sorted(set(map(str, entry)) - _RULE_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(unknown)}")
    try:
        principals = tuple(PrincipalPattern.parse(p) for p in _strings(entry, "principals"))
        methods = tuple(MethodPattern.parse(m, known_methods) for m in _strings(entry, "methods"))
    except (ValueError, TypeError) as error:
        raise PolicyError(f"{where}: {error}") from None
    return Rule(name, principals, methods)


def _strings(entry: dict[object, object], key: str) -> Iterable[str]:
    values = entry.get(key)
    if not isinstance(values, list) or not values:
        raise ValueError(f"'{key}' must be a non-empty list")
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"'{key}' must hold strings, not {value!r}")
    return values


def _service_of(method: str) -> str:
    return method[1:].partition("/")[0]


__all__ = [
    "BASELINE_SERVICES",
    "Decision",
    "MethodPattern",
    "Policy",
    "PolicyError",
    "PrincipalPattern",
    "Rule",
    "load_policy",
    "parse_policy",
]
