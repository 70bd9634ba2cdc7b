"""The judge template language: two placeholders and doubled braces, nothing else.

A template is text with exactly two placeholders, ``{prompt}`` and ``{response}``.
``{{`` stands for a literal ``{`` and ``}}`` for a literal ``}`` (the escape that
``str.format`` users know, so existing templates keep their meaning). Every other
brace is an error: an unknown placeholder (``{rubric}``), a format spec
(``{response:>9}``), attribute or index access (``{prompt.__class__}``,
``{prompt[0]}``) and a lone ``{`` or ``}`` are refused with their position, instead of
being interpreted by Python's formatter. Rendering is one left-to-right pass over the
template: the prompt and response are inserted as they are and never scanned again, so
braces inside them stay literal.

``{{prompt}}`` is the literal text ``{prompt}``, not a placeholder: a template whose
only ``{prompt}`` is written that way does not contain the placeholder and is refused.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Union

PLACEHOLDERS = ("prompt", "response")  # the judge's; the evaluator's are prompt, first, second


@lru_cache(maxsize=8)
def _token(placeholders: tuple) -> "re.Pattern":
    # One alternation scanned left to right: escapes first, then the placeholders, then
    # any other brace (an error). Linear in the template's length.
    names = "|".join(re.escape(n) for n in placeholders)
    return re.compile(r"\{\{|\}\}|\{(" + names + r")\}|\{|\}")


class TemplateError(ValueError):
    """A template that is not text with {prompt}, {response} and doubled braces."""


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {col}"


def parse_template(text: str, placeholders: tuple = PLACEHOLDERS) -> list[Union[str, tuple[str]]]:
    """The template as literal strings and ``(name,)`` placeholders; TemplateError on any
    other brace."""
    if not isinstance(text, str):
        raise TemplateError(f"must be text, not {type(text).__name__}")
    parts: list[Union[str, tuple[str]]] = []
    literal: list[str] = []
    last = 0
    for m in _token(placeholders).finditer(text):
        literal.append(text[last:m.start()])
        token = m.group(0)
        if token == "{{":
            literal.append("{")
        elif token == "}}":
            literal.append("}")
        elif m.group(1):
            parts.append("".join(literal))
            literal = []
            parts.append((m.group(1),))
        else:
            close = text.find("}", m.start()) if token == "{" else -1
            shown = text[m.start():close + 1] if 0 <= close - m.start() <= 40 else token
            names = " and ".join("{" + n + "}" for n in placeholders)
            raise TemplateError(
                f"{shown!r} at {_where(text, m.start())}: the only placeholders are {names} "
                "(no other names, format specs, attributes or indexes); write a literal brace as {{ or }}"
            )
        last = m.end()
    literal.append(text[last:])
    parts.append("".join(literal))
    return [p for p in parts if p != ""]


def template_problem(text: str, placeholders: tuple = PLACEHOLDERS) -> str | None:
    """Why ``text`` is not a usable template (None when it is): a brace that is not a
    placeholder or an escape, or a missing placeholder."""
    try:
        parts = parse_template(text, placeholders)
    except TemplateError as e:
        return str(e)
    names = {p[0] for p in parts if isinstance(p, tuple)}
    for name in placeholders:
        if name not in names:
            hint = f" ({{{{{name}}}}} is the literal text {{{name}}}, not the placeholder)" if "{{" + name + "}}" in text else ""
            return f"must contain the placeholder {{{name}}}{hint}"
    return None


def render_template(text: str, prompt: str, response: str) -> str:
    """The judge template with its placeholders replaced; the values are inserted verbatim."""
    return render_values(text, {"prompt": prompt, "response": response})


def render_values(text: str, values: dict[str, str]) -> str:
    """A template whose placeholders are exactly ``values``' keys, rendered in one pass
    (braces inside the values stay as they are)."""
    parts = _parsed(text, tuple(values))
    return "".join(values[p[0]] if isinstance(p, tuple) else p for p in parts)


@lru_cache(maxsize=32)
def _parsed(text: str, placeholders: tuple) -> tuple:
    # a judge phase renders one template thousands of times
    return tuple(parse_template(text, placeholders))
