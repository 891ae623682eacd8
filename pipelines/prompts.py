"""The prompts the steps send, from versioned templates under ``config/prompts/`` (package data).

What a seller wrote never becomes part of the instructions: a template is fixed text with ``$name``
slots, and each slot is filled with ``quote(value)``, one JSON string with ``<`` and ``>`` escaped,
so the value can neither end its delimiters (``</product_description>``) nor carry chat role tokens
(``<|im_start|>``), and its quotes and line breaks stay inside the string. A change to what the model
is told is a new file (``copy.v2.txt``) and a new name below, so a stored output can say which one
made it.

Template files: lines starting with ``#`` are comments; ``=== role ===`` starts a section (a chat
message's role, or ``prompt`` for a media prompt); ``$$`` is a literal dollar sign.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files
from string import Template

COPY_PROMPT = "copy.v1"
IMAGE_PROMPT = "image.v1"
VIDEO_PROMPT = "video.v1"
_SECTION = re.compile(r"^=== (\w+) ===$")


def quote(value: str) -> str:
    """``value`` as inert data: a JSON string, with ``<`` and ``>`` as ``\\u003c`` and ``\\u003e``."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


@cache
def template(name: str) -> tuple[tuple[str, Template], ...]:
    """The sections of ``config/prompts/<name>.txt``, in order: ``(role, text)``."""
    text = files("genline.config").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        head = _SECTION.match(line)
        if head:
            sections.append((head.group(1), []))
        elif sections:
            sections[-1][1].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"prompt template {name} has text before its first === section ===")
    if not sections:
        raise ValueError(f"prompt template {name} has no === section ===")
    return tuple((role, Template("\n".join(lines).strip("\n"))) for role, lines in sections)


def render(name: str, **values: str) -> list[dict[str, str]]:
    """The template's sections as ``{"role", "content"}``, each ``$name`` filled with ``quote(value)``."""
    quoted = {key: quote(value) for key, value in values.items()}
    return [{"role": role, "content": body.substitute(quoted)} for role, body in template(name)]


def copy_messages(description: str) -> list[dict[str, str]]:
    return render(COPY_PROMPT, description=description)


def image_prompt(description: str, headline: str) -> str:
    (section,) = render(IMAGE_PROMPT, description=description, headline=headline)
    return section["content"]


def video_prompt(headline: str) -> str:
    (section,) = render(VIDEO_PROMPT, headline=headline)
    return section["content"]
