"""One way to declare and check a setting: type hints plus field metadata.

Every configurable value of the project is checked here: the inference options and run options
(dataclasses whose fields carry a :class:`Setting`), the training configs (dataclasses too) and
the keyword arguments of the models built from YAML (checked against the constructor's type
hints). An error always reads ``<name>: expected <what>, got <value>``, where the name is what
the user typed: a command-line flag, or the dotted config key.

:func:`setting` declares a dataclass field: its default, its flag (``None``: config-only), its
help text and its range or choices; :func:`check_fields` (called from ``__post_init__``) checks
every field of an instance against its type hint and its setting.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_MISSING = dataclasses.MISSING


class SettingError(ValueError):
    """A value of the wrong type or out of range; the message names the flag or key."""


@dataclass(frozen=True)
class Setting:
    """What a field means to the user: flag, help, allowed values (all optional).

    ``low``/``high`` bound numbers (``low_open``: strictly above ``low``); ``choices`` lists the
    allowed values (a callable returns them, for registries filled later); ``high_open``:
    strictly below ``high``; ``multiple``: a
    positive multiple of it; ``group``: the heading of the flag in ``--help``; ``metavar``:
    how ``--help`` shows the value; ``needs``: ``(used, what)``, where ``used(root config)``
    tells whether the value matters at all and ``what`` says what makes it matter (a value given
    where it would be ignored is refused: :func:`check_needs`).
    """

    flag: str | None = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    multiple: int | None = None
    group: str | None = None
    metavar: str | None = None
    needs: tuple[Callable[[Any], bool], str] | None = None

    def allowed(self) -> Sequence[Any] | None:
        """The allowed values (``None``: any of the type)."""
        return self.choices() if callable(self.choices) else self.choices


SETTING_KEY = "diffbir.setting"


def setting(default: Any = _MISSING, *, factory: Callable[[], Any] | None = None, **spec: Any):
    """A dataclass field with a :class:`Setting` in its metadata (``factory``: default factory)."""
    metadata = {SETTING_KEY: Setting(**spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spec_of(field: dataclasses.Field) -> Setting:
    """The field's :class:`Setting` (an empty one when it has none)."""
    return field.metadata.get(SETTING_KEY, Setting())


def name_of(field: dataclasses.Field, prefix: str = "") -> str:
    """How errors call a field: its flag, else its dotted key."""
    return spec_of(field).flag or f"{prefix}{field.name}"


# ------------------------------------------------------------------------------------- types

_TYPE_NAMES = {
    int: "an integer",
    float: "a finite number",
    bool: "true or false",
    str: "a string",
    type(None): "null",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the type ``hint`` (``None``: a hint this module does not check)."""
    if hint is Any:
        return True
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or isinstance(value, float)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(hint)]
        if any(results):
            return True
        return None if None in results else False
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, Sequence) and typing.get_args(hint):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        item = typing.get_args(hint)[0]
        results = [_matches(v, item) for v in value]
        return None if None in results else all(results)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return None


def describe(hint: Any) -> str:
    """The words for a type hint in an error message (``an integer or null``)."""
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [
            a for a in typing.get_args(hint) if not (a is int and float in typing.get_args(hint))
        ]
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (list, tuple, Sequence) and typing.get_args(hint):
        return f"a list of {describe(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    if hint is Any:
        return "a value"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_type(value: Any, hint: Any, name: str, what: str | None = None) -> None:
    """Raise :class:`SettingError` unless ``value`` fits ``hint`` (hints this module cannot
    check pass); floats must be finite. ``what``: how to say what was expected."""
    fits = _matches(value, hint)
    finite = not isinstance(value, float) or math.isfinite(value)
    if fits is False or not finite:
        raise SettingError(f"{name}: expected {what or describe(hint)}, got {value!r}")


def _range_words(spec: Setting) -> str:
    low, high = spec.low, spec.high
    if low is not None and high is not None:
        left, right = "(" if spec.low_open else "[", ")" if spec.high_open else "]"
        return f"in {left}{low}, {high}{right}"
    if low is not None:
        return f"> {low}" if spec.low_open else f">= {low}"
    return f"< {high}" if spec.high_open else f"<= {high}"


def _in_range(value: Any, spec: Setting) -> bool:
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        return False
    return spec.high is None or (value < spec.high if spec.high_open else value <= spec.high)


def check_value(value: Any, hint: Any, spec: Setting, name: str) -> None:
    """Type, range, multiple and choices of one value (``None`` passes where the hint allows
    it: "not set"); the range of a list applies to each item."""
    bounded = spec.low is not None or spec.high is not None
    what = describe(hint) + (f" {_range_words(spec)}" if bounded else "")
    check_type(value, hint, name, what)
    if value is None:
        return
    allowed = spec.allowed()
    if allowed is not None and value not in allowed:
        raise SettingError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if bounded and not all(_in_range(v, spec) for v in items):
        raise SettingError(f"{name}: expected {what}, got {value}")
    if spec.multiple is not None and (value <= 0 or value % spec.multiple):
        raise SettingError(f"{name}: expected a positive multiple of {spec.multiple}, got {value}")


def hints_of(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass (or callable)."""
    return typing.get_type_hints(cls)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of dataclass instance ``obj`` against its hint and :class:`Setting`
    (nested dataclasses check themselves when built)."""
    hints = hints_of(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            continue
        check_value(value, hints[field.name], spec_of(field), name_of(field, prefix))


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted key, field, hint)`` of every non-dataclass field under dataclass ``cls``."""
    hints = hints_of(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from leaves(hint, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", field, hint


def check_mapping(data: Any, cls: type, prefix: str = "") -> None:
    """Check a plain mapping (a YAML config) against dataclass ``cls``: unknown and missing
    keys, types, ranges and choices, each error naming the dotted key. Nested dataclass fields
    are checked recursively (``None`` where the hint allows it)."""
    where = prefix[:-1] or "the config"
    if not isinstance(data, Mapping):
        raise SettingError(f"{where}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise SettingError(
            f"unknown config key {prefix + str(unknown[0])!r}; known keys here: {sorted(fields)}"
        )
    hints = hints_of(cls)
    for name, field in fields.items():
        key = prefix + name
        if name not in data:
            if field.default is _MISSING and field.default_factory is _MISSING:
                raise SettingError(f"{key}: missing (expected {describe(hints[name])})")
            continue
        value, hint = data[name], hints[name]
        nested = _dataclass_of(hint)
        if nested is not None and value is not None:
            check_mapping(value, nested, key + ".")
        elif nested is None:
            check_value(value, hint, spec_of(field), key)
        elif type(None) not in typing.get_args(hint):
            raise SettingError(f"{key}: expected a mapping of keys, got null")


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a hint names (``X`` or ``X | None``), else ``None``."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    ):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def check_needs(root: Any, given: Iterator[str] | Sequence[str]) -> None:
    """Refuse given keys (dotted, under dataclass instance ``root``) that ``root`` would ignore
    (see :attr:`Setting.needs`)."""
    specs = {key: (field, spec_of(field)) for key, field, _ in leaves(type(root))}
    unused = [key for key in given if key in specs and specs[key][1].needs
              and not specs[key][1].needs[0](root)]  # fmt: skip
    if unused:
        what = specs[unused[0]][1].needs[1]
        names = [name_of(specs[k][0]) for k in unused if specs[k][1].needs[1] == what]
        pronoun = "it" if len(names) == 1 else "them"
        raise SettingError(f"{', '.join(names)}: only used with {what}, or drop {pronoun}")


# ------------------------------------------------------------------------ keyword arguments


def check_arguments(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Unknown keys and values of the wrong type for ``fn(**kwargs)`` (a class: its
    ``__init__``), from its signature and type hints; the error names ``<where>.<key>``."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    signature = inspect.signature(target)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        known = [p.name for p in params]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise SettingError(
                f"unknown key(s) {[f'{where}.{k}' for k in unknown]} for "
                f"{getattr(fn, '__name__', fn)}; known keys: {known}"
            )
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: the call itself reports bad values
        return
    for key, value in kwargs.items():
        if key in hints:
            check_type(value, hints[key], f"{where}.{key}")


def checked_call(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> Any:
    """``fn(**kwargs)`` after :func:`check_arguments`."""
    check_arguments(fn, kwargs, where)
    return fn(**kwargs)
