"""Method parameter widgets, generated from each method's config dataclass (no hand-written list).

Every field of a registered method's config becomes a :class:`ParamSpec`: its kind (``bool``, ``int``,
``float``, ``choice``, ``text`` or ``json``), its default, its choices when its help text quotes them, and the
help text itself (the field's ``metadata["help"]``, what ``diffaccel methods`` prints). The UI turns specs into
widgets; :func:`params_from_widgets` turns widget values back into method keywords, keeping only the values
that differ from the defaults, and the method's own ``validate()`` checks ranges (its message names the field,
the value and what is allowed). Nothing here imports gradio.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from diffaccel.errors import ConfigError
from diffaccel.methods.base import method_class

KINDS = ("bool", "int", "float", "choice", "text", "json")
"""Widget kinds: checkbox, integer box, number box, dropdown, text box, JSON text box (lists, dicts, None)."""

_QUOTED = re.compile(r"'([A-Za-z0-9_./-]+)'")


@dataclass(frozen=True)
class ParamSpec:
    """One config field as a widget.

    Attributes:
        name: the field name (the method keyword).
        kind: one of :data:`KINDS`.
        default: the field's default (for ``json`` fields, the Python value; the widget shows its JSON).
        help: the field's help text.
        type_name: the annotation as written in the config class.
        choices: the allowed strings of a ``choice`` field (quoted in its help text), else ``()``.
    """

    name: str
    kind: str
    default: Any
    help: str
    type_name: str
    choices: tuple[str, ...] = ()

    @property
    def widget_default(self) -> Any:
        """The value the widget starts with (JSON text for ``json`` fields, "" for None)."""
        if self.kind == "json":
            return "" if self.default is None else json.dumps(_jsonable(self.default))
        return self.default

    @property
    def label(self) -> str:
        return f"{self.name} ({self.type_name})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _kind(type_name: str, default: Any, help_text: str) -> tuple[str, tuple[str, ...]]:
    name = type_name.replace(" ", "")
    if name == "bool":
        return "bool", ()
    if name == "int":
        return "int", ()
    if name == "float":
        return "float", ()
    if name == "str":
        choices = tuple(dict.fromkeys(_QUOTED.findall(help_text)))
        if len(choices) >= 2 and default in choices:
            return "choice", choices
        return "text", ()
    return "json", ()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def param_specs(method: str) -> list[ParamSpec]:
    """The widgets of ``method``'s config fields, in declaration order (an unknown method raises)."""
    cls = method_class(method)
    specs = []
    for f in dataclasses.fields(cls.config_class):
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_text = f.metadata.get("help", "")
        default = _default(f)
        kind, choices = _kind(type_name, default, help_text)
        specs.append(ParamSpec(f.name, kind, default, help_text, type_name, choices))
    return specs


def _parse(spec: ParamSpec, value: Any, method: str) -> Any:
    """A widget value as the method keyword value (raises :class:`ConfigError` naming the parameter)."""
    where = f"{method}.{spec.name}"
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if spec.kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if spec.kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if spec.kind in ("choice", "text"):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    text = "" if value is None else str(value).strip()
    if not text or text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{where} must be JSON (a number, a list such as [8, 8], a dict or null), got {text!r}") from None


def _same(spec: ParamSpec, value: Any) -> bool:
    return _jsonable(value) == _jsonable(spec.default)


def params_from_widgets(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """Method keywords from widget values ``{field: value}``: parsed, and only those that differ from the
    defaults (so a field whose default is a Python object the widget cannot show is left to the config)."""
    specs = {s.name: s for s in param_specs(method)}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)} for method {method!r}; allowed: "
                          f"{', '.join(specs) or '(none)'}")
    params = {}
    for name, value in values.items():
        parsed = _parse(specs[name], value, method)
        if not _same(specs[name], parsed):
            params[name] = parsed
    return params


def type_hints_text(method: str) -> str:
    """One line per field, ``name (type, default): help``, for the UI's parameter help."""
    lines = []
    for s in param_specs(method):
        lines.append(f"- `{s.name}` ({s.type_name}, default `{s.widget_default!r}`): {s.help}")
    return "\n".join(lines)


__all__ = ["KINDS", "ParamSpec", "param_specs", "params_from_widgets", "type_hints_text"]
