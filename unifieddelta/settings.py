"""``KEY=VALUE`` settings as people type them (``--set p=0.9``, ``--grid p=0.1,0.5``, ``tiny-lm[sft_lr=5e-5]``):
one parser, values read as int, float, true/false/none, or else kept as text."""

from __future__ import annotations

from .errors import InvalidParameterError


def parse_value(text: str) -> object:
    """``"3"`` -> 3, ``"5e-5"`` -> 5e-05, ``"true"`` -> True, ``"none"`` -> None, anything else the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_settings(items: list[str] | None, what: str = "--set") -> dict[str, object]:
    """``["p=0.9", "k=0"]`` -> ``{"p": 0.9, "k": 0}``; ``what`` names the option in the error."""
    params: dict[str, object] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(f"{what} expects KEY=VALUE, got {item!r}")
        params[key.strip()] = parse_value(text.strip())
    return params
