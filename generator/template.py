"""Message templates: ``"disruption {new.location_id} on {recipient.route_name}"``.

``{scope.column}`` names a value of the changed row (``new``/``old``) or of the
recipients query (``recipient``); ``{{`` and ``}}`` are literal braces. The
parse yields literal parts and placeholders, which the renderer turns into a
SQL ``concat(...)`` — values are never pasted into SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

from pushsync.errors import Location
from pushsync.generator.model import Literal_, Placeholder, Scope, Template, TemplatePart

_PLACEHOLDER = re.compile(r"(new|old|recipient)\.([a-z_][a-z0-9_]*)\Z")


class TemplateError(Exception):
    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.column = column  # 1-based, within the template text


def parse(text: str, locate: Callable[[int], Location]) -> Template:
    """Parse ``text``; ``locate(column)`` maps a 1-based column to the file."""
    parts: list[TemplatePart] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if text.startswith("{{", i) or text.startswith("}}", i):
            literal.append(char)
            i += 2
        elif char == "}":
            raise TemplateError("unbalanced '}' (write '}}' for a literal brace)", i + 1)
        elif char == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError("unbalanced '{' (write '{{' for a literal brace)", i + 1)
            body = text[i + 1 : end].strip()
            match = _PLACEHOLDER.match(body)
            if match is None:
                raise TemplateError(
                    f"bad placeholder {{{body}}}: expected {{new.column}}, {{old.column}} "
                    "or {recipient.column}",
                    i + 1,
                )
            if literal:
                parts.append(Literal_(text="".join(literal)))
                literal = []
            scope = cast(Scope, match.group(1))
            parts.append(Placeholder(scope=scope, column=match.group(2), location=locate(i + 1)))
            i = end + 1
        else:
            literal.append(char)
            i += 1
    if literal:
        parts.append(Literal_(text="".join(literal)))
    return Template(parts=tuple(parts), location=locate(1))
