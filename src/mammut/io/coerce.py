"""Plain data -> config dataclasses, checked against the field annotations.

The one coercer behind ``config.json`` of a checkpoint (``mammut.io.checkpoint``, strict JSON
values) and the training configuration (``mammut.train.config``: YAML files and ``--key value``
command-line overrides). Every error names the dotted key, what was expected and what was given
(``train.steps: expected an integer, got 'many'``; ``data.num_emojis: unknown key (did you mean
'num_emoji'?); valid keys: ...``) and is raised as the caller's exception class (``error=``).

Values are checked, and converted only where the annotation asks for it: tuples and nested
dataclasses are rebuilt from lists and mappings, an int is accepted for a float. Strings are
taken literally unless the caller says they are command-line text (``parse_text=``, e.g.
``yaml.safe_load``): then ``"3"`` is an int where one is expected, ``"off"`` a bool, ``"null"``
None for an optional field, and ``parse_text`` reads a list or a mapping (``"[0.9, 0.98]"``).
An annotation it does not interpret (a class, a callable) passes the value through, for the
dataclass's own checks.

Standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["CoerceError", "coerce", "unknown_key_message"]

TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")
NULL_WORDS = ("null", "none")
_SHORT = 80


class CoerceError(ValueError):
    """A value that does not fit its annotation (the default ``error=``; the message names the key)."""


def coerce(
    value: Any,
    tp: Any,
    key: str,
    *,
    error: type[Exception] = CoerceError,
    parse_text: Callable[[str], Any] | None = None,
) -> Any:
    """``value`` checked against annotation ``tp`` (converted where the annotation asks for a
    tuple, a float or a dataclass); raises ``error`` naming ``key`` when it does not fit.

    A dataclass ``tp`` is built from the mapping ``value`` after checking every key (an unknown
    one names the closest valid key) and every value; fields left out take their defaults, and
    an error of the constructor becomes ``error("<key>: <message>")`` (one that already is an
    ``error`` passes through unchanged).

    ``parse_text``: strings are command-line text (see the module docstring); it reads the text
    of a list or a mapping."""
    return _Coercer(error, parse_text).coerce(value, tp, key)


def unknown_key_message(key: str, name: str, valid: list[str]) -> str:
    """``"<key>: unknown key (did you mean '<closest>'?); valid keys: a, b, c"``."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown key{hint}; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


class _Coercer:
    def __init__(self, error: type[Exception], parse_text: Callable[[str], Any] | None) -> None:
        self.error, self.parse_text = error, parse_text

    def fail(self, key: str, expected: str, value: Any) -> Exception:
        return self.error(f"{key}: expected {expected}, got {_short(value)}")

    # ----------------------------------------------------------------------------- dataclasses
    def build(self, cls: type, values: Any, key: str) -> Any:
        if not isinstance(values, dict):
            raise self.fail(key, "a mapping", values)
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - unresolvable annotations: the constructor checks alone
            hints = {}
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs = {}
        for name, value in values.items():
            if name not in names:
                raise self.error(unknown_key_message(_join(key, name), str(name), names))
            kwargs[name] = self.coerce(value, hints.get(name, Any), _join(key, name))
        try:
            return cls(**kwargs)
        except self.error:
            raise
        except (TypeError, ValueError) as exc:  # a message naming the dotted key already is kept as it is
            raise self.error(str(exc) if str(exc).startswith(f"{key}.") else f"{key}: {exc}") from exc

    # ----------------------------------------------------------------------------- values
    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        if tp is Any or isinstance(tp, typing.TypeVar):
            return value
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        text = self.parse_text is not None and isinstance(value, str)
        if origin is typing.Union or origin is types.UnionType:
            if type(None) in args and (value is None or (text and value.lower() in NULL_WORDS)):
                return None
            for arm in args:
                if arm is type(None):
                    continue
                try:
                    return self.coerce(value, arm, key)
                except self.error:
                    continue
            raise self.fail(key, " or ".join(_type_name(a) for a in args), value)
        if origin is typing.Literal:
            if value in args:
                return value
            raise self.fail(key, f"one of {list(args)}", value)
        if tp is type(None):
            if value is None or (text and value.lower() in NULL_WORDS):
                return None
            raise self.fail(key, "null", value)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self.build(tp, value, key)
        if origin in (tuple, list) or tp in (tuple, list):
            return self._sequence(value, tuple if tuple in (origin, tp) else list, args, key)
        if origin is dict or tp is dict:
            return self._mapping(value, args, key)
        if tp in (bool, int, float, str):
            return self._scalar(value, tp, key, text)
        return value  # an annotation not interpreted here: left to the dataclass's own checks

    def _sequence(self, value: Any, kind: type, args: tuple[Any, ...], key: str) -> Any:
        if isinstance(value, str) and self.parse_text is not None:
            value = self.parse_text(value)
        if not isinstance(value, (list, tuple)):
            raise self.fail(key, "a list", value)
        if kind is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise self.fail(key, f"a list of {len(args)} values", value)
            return tuple(self.coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [self.coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if kind is tuple else out

    def _mapping(self, value: Any, args: tuple[Any, ...], key: str) -> dict[Any, Any]:
        if isinstance(value, str) and self.parse_text is not None:
            value = self.parse_text(value)
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping", value)
        if len(args) != 2:
            return dict(value)
        key_type, value_type = args
        # keys of JSON objects (and often of YAML mappings) are strings: read them as text
        keys = _Coercer(self.error, self.parse_text or (lambda s: s))
        return {keys.coerce(k, key_type, key): self.coerce(v, value_type, _join(key, k)) for k, v in value.items()}

    def _scalar(self, value: Any, tp: type, key: str, text: bool) -> Any:
        if tp is bool:
            if text and value.lower() in TRUE_WORDS + FALSE_WORDS:
                return value.lower() in TRUE_WORDS
            if not isinstance(value, bool):
                raise self.fail(key, "true or false", value)
            return value
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(key, "a string", value)
            return value
        if text:
            try:
                value = tp(value)
            except ValueError:
                pass
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, "an integer", value)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "a number", value)
        return float(value)
