"""Finding the layers a method adapts, by name, on any model.

A target matches a module name the way Hugging Face PEFT's `target_modules` does:
  - an exact name:     "bert.encoder.layer.0.attention.self.query"
  - a dotted suffix:   "query" or "attention.self.query" (matches at a "." boundary)
  - a regex:           r"layer\\.[0-2]\\..*\\.query" (must match the whole name)
Errors say what was looked for, what is close, and what exists, and are raised before the
model is touched.

Regexes are bounded. Python's re backtracks, so a pattern such as ([a-z0-9.]+)+Z takes time
exponential in the name's length, and a target can come from a file (adapter.json, a PEFT
config). Rather than time a match (a running re call cannot be interrupted) or drop regex
targets (PEFT's format has them), `regex_risk` reads the parsed pattern and refuses, before
any matching: a repeated group holding another quantifier or an alternation ((a+)+, (a|ab)*,
(a?){30}), backreferences, more than MAX_REPEATS quantifiers that repeat more than once
(.*.*.*.* is polynomial of that degree), and patterns over MAX_PATTERN characters. What is
left matches a module name in time at most cubic in its length: well under a millisecond.
"""

from __future__ import annotations

import difflib
import functools
import re

from torch import nn

try:  # the parser behind re: sre_parse before Python 3.11, re._parser since
    import re._parser as _sre
except ImportError:  # pragma: no cover
    import sre_parse as _sre

from ..layers.names import under


class TargetError(ValueError):
    """A target names no layer, or a layer of the wrong kind. The model is unchanged."""


MAX_PATTERN, MAX_REPEATS = 256, 3
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | ({_sre.POSSESSIVE_REPEAT} if hasattr(_sre, "POSSESSIVE_REPEAT") else set())


def regex_risk(pattern: str) -> str | None:
    """Why matching `pattern` as a regex could take exponential (or high polynomial) time, or
    None when it is safe. A pattern that is no valid regex is safe: it only matches literally."""
    if len(pattern) > MAX_PATTERN:
        return f"it is {len(pattern)} characters long (at most {MAX_PATTERN})"
    try:
        tree = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None
    repeats = 0

    def walk(items, repeated: bool):
        nonlocal repeats
        for op, av in items:
            if op in _REPEATS:
                many = av[1] > 1  # MAXREPEAT for *, + and {n,}
                if repeated:
                    return "a quantifier inside a repeated group (nested quantifiers, as in (a+)+)"
                repeats += many
                why = walk(av[2], many)
            elif op is _sre.BRANCH:
                if repeated:
                    return "an alternation inside a repeated group (as in (a|ab)+)"
                why = next((w for b in av[1] if (w := walk(b, repeated))), None)
            elif op is _sre.SUBPATTERN:
                why = walk(av[-1], repeated)
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                why = walk(av[1], repeated)
            elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
                return "a backreference"
            elif op is getattr(_sre, "ATOMIC_GROUP", None):
                why = walk(av, repeated)
            else:
                why = None
            if why:
                return why
        return None

    why = walk(tree, False)
    if why is None and repeats > MAX_REPEATS:
        why = f"{repeats} quantifiers that repeat (at most {MAX_REPEATS}, as in .*.*.*)"
    return why


@functools.lru_cache(maxsize=256)
def _pattern(target: str):
    """`target` compiled as a regex (None if it is none), or TargetError if it is unsafe."""
    why = regex_risk(target)
    if why:
        raise TargetError(f"target {target[:80]!r} is refused as a regex: {why}, which can take exponential "
                          "time to match. Name the layers instead (exact or as a dotted suffix, e.g. 'query'), "
                          r"or use a simpler regex such as r'.*layer\.[0-2]\..*\.query'.")
    try:
        return re.compile(target)
    except (re.error, RecursionError, OverflowError):
        return None


def name_matches(name: str, target: str) -> bool:
    """True when module `name` is selected by `target` (exact, dotted suffix, or full regex).
    Raises TargetError for a regex that could backtrack for ever (see `regex_risk`)."""
    pattern = _pattern(target)
    if name == target or name.endswith("." + target):
        return True
    return pattern is not None and pattern.fullmatch(name) is not None


def suffix_matches(name: str, pattern: str) -> bool:
    """True when regex `pattern` matches a dotted tail of `name` (used by adapter placements)."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def linear_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear in the model, in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _short_list(names: list[str], limit: int = 12) -> str:
    """Unique last components first (what people type), then a count of the full names."""
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return f"{shown} ({len(names)} Linear layers in all)"


def resolve(model: nn.Module, targets, kind=nn.Linear, what: str = "LoRA",
            exclude: tuple[str, ...] = ()) -> list[str]:
    """The names of the modules selected by `targets`, checked to be instances of `kind`.

    Every target must select at least one module. Raises TargetError otherwise.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise TargetError(f"{what} needs at least one target layer name, got none.")
    modules = dict(model.named_modules())
    names = [n for n in modules if n and not any(under(n, e) for e in exclude)]
    chosen: list[str] = []
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TargetError(f"{what} target names must be non-empty strings, got {t!r}.")
        hits = [n for n in names if name_matches(n, t)]
        if not hits:
            raise TargetError(_unknown_message(model, t, what, kind))
        wrong = [n for n in hits if not isinstance(modules[n], kind)]
        if wrong:
            n = wrong[0]
            inside = [x for x in linear_names(modules[n])]
            hint = (f" Linear layers inside it: {', '.join(inside[:6])}." if inside else "")
            raise TargetError(
                f"{what} target {t!r} selects {n!r}, a {type(modules[n]).__name__}; {what} wraps "
                f"{_kind_name(kind)} layers only.{hint} Name the Linear layers instead.")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _kind_name(kind) -> str:
    return ", ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _unknown_message(model: nn.Module, target: str, what: str, kind=nn.Linear) -> str:
    linears = linear_names(model)
    # The other layer kinds the method wraps (GPT-2's Conv1D, embeddings, convolutions), by kind.
    others: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if n and isinstance(m, kind) and not isinstance(m, nn.Linear):
            others.setdefault(type(m).__name__, []).append(n)
    names = linears + [n for ns in others.values() for n in ns]
    candidates = list(dict.fromkeys([n.rsplit(".", 1)[-1] for n in names] + names))
    close = difflib.get_close_matches(target, candidates, n=3, cutoff=0.6)
    did = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    more = "".join(f"; {k} layers: {_short_list(ns).replace(' Linear layers', ' layers')}" for k, ns in others.items())
    return (f"unknown {what} target {target!r}: no module name equals it, ends with "
            f"'.{target}' or matches it as a regex.{did} Linear layers in this model: "
            f"{_short_list(linears)}{more}.")


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding `name` and the attribute name under which it is held."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = get_parent(model, name)
    setattr(parent, attr, new)
