"""Prompt injection in what a seller writes: noticed by heuristics, then flagged or refused per feature.

A description is data about a product; text in it that speaks to the model is suspect. The signals
(each a name, recorded and logged; the text itself never is):

    instruction_override  "ignore / disregard / forget ... previous / above / your ... instructions",
                          "your new task", "from now on you ...", "you are now a ... assistant"
    role_marker           chat-format tokens (<|im_start|>, [INST], <<SYS>>, <|eot_id|> ...) and lines
                          such as "system: you must ..." or "### Instruction"
    prompt_probe          "reveal / repeat / print your system prompt", "what are your instructions"
    blocklist             a phrase of the feature's ``injection_blocklist`` (config/catalog.json)

The text is normalised first (NFKC, zero-width characters dropped, runs of spaces folded), so
full-width letters or a zero-width space inside "ignore" do not hide it. Whatever the outcome, a
description reaches the model only as quoted data inside a fixed template (``pipelines/prompts.py``).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

SIGNALS = ("instruction_override", "role_marker", "prompt_probe", "blocklist")
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"))

_W = r"(?:\W+\w+){0,4}?\W+"  # up to four words in between
_VERB = r"\b(?:ignore|disregard|forget|override|overrule|bypass|skip|discard|drop|abandon|neglect)\b"
_EARLIER = r"\b(?:previous|prior|above|earlier|preceding|foregoing|original|initial|system|developer|hidden)\b"
_ORDERS = (
    r"\b(?:instructions?|prompts?|rules|directions|guidelines|guidance|guardrails|directives|constraints|context|"
    r"commands|orders|messages?)\b"
)
_STRONG_ORDERS = r"\b(?:instructions?|prompts?|directives|system\s+prompt|system\s+message)\b"


def _gated(alternatives: str, leads: str) -> re.Pattern[str]:
    """``alternatives`` (case-insensitive) behind a look-ahead for their first letters: every
    alternative starts at a word boundary with one of ``leads`` (a test checks this against the
    pattern), so re rules out in one step each place none can start instead of trying each
    alternative there. The same matches, ~2.5x faster (~380 -> ~145 us on 2,000 characters)."""
    return re.compile(rf"(?=\b[{leads}])(?:{alternatives})", re.IGNORECASE)


_OVERRIDE_ALTERNATIVES = "|".join(
    [
        # ignore the previous instructions / disregard everything above / forget your rules
        rf"{_VERB}{_W}?{_EARLIER}{_W}?{_ORDERS}",
        rf"{_VERB}\W+(?:all|any|your|these|those|the|my)\b{_W}?{_STRONG_ORDERS}",
        rf"{_VERB}\W+(?:everything|all)\W+(?:above|before|previously|so\s+far|you\s+(?:were|have\s+been)\s+told)\b",
        rf"{_VERB}\W+your\W+(?:rules|guidelines|programming|training|role)\b",
        r"\b(?:new|updated|real)\s+(?:system\s+prompt|instructions?\s+for\s+(?:you|the\s+(?:ai|model|assistant)))\b",
        r"\byour\s+(?:new|real|actual|true)\s+(?:task|role|instructions?|purpose|goal)\b",
        r"\bfrom\s+now\s+on\W+(?:you\s+(?:must|shall|should|only|always|never|answer|respond|reply|act|ignore|"
        r"are\s+(?:a|an)\b)|act|respond|answer|reply|only|always|never|ignore)\b",
        r"\byou\s+are\s+(?:now|no\s+longer)\b(?:\W+\w+){0,3}?\W+"
        r"(?:assistant|ai|model|chatbot|bot|gpt|llm|bound|restricted|limited|dan|jailbroken|free)\b",
        r"\b(?:pretend|imagine)\s+(?:that\s+)?you\s+(?:are|have)\s+(?:no|an?\s+(?:ai|assistant|model|chatbot))\b",
        r"\b(?:instead|rather)\b\W+(?:write|say|output|print|respond|reply|answer)\b(?:\W+\w+){0,4}?\W+"
        r"(?:following|exactly|verbatim)\b",
        r"\b(?:do\s+not|don'?t)\s+(?:follow|obey)\s+(?:the|your|any)\s+(?:previous|prior|above|system|original)?\s*"
        r"(?:instructions?|rules|prompts?)\b",
    ]
)
_OVERRIDE = _gated(_OVERRIDE_ALTERNATIVES, "abdfinoprsuy")
_ROLE_TOKENS = re.compile(
    r"<\|\s*(?:im_start|im_end|im_sep|system|user|assistant|endoftext|begin_of_text|end_of_text|start_header_id|"
    r"end_header_id|eot_id|eom_id|fim_\w+)\s*\|>"
    r"|\[/?INST\]|<</?SYS>>|</?s>|<\|?(?:system|assistant)\|?>|</?(?:system|assistant|instructions?)>"
    r"|^\s*#{2,}\s*(?:system|instruction|instructions|response|assistant)\b",
    re.IGNORECASE | re.MULTILINE,
)
# "system:" or "assistant:" opening a line counts when the line speaks to the model; a spec line
# such as "System: Android 14" does not.
_ROLE_LINE = re.compile(
    r"^\s*(?:system|assistant|developer|ai|model)\s*(?:prompt\s*)?:\s*(?P<rest>.*)$", re.IGNORECASE | re.MULTILINE
)
_TO_THE_MODEL = re.compile(
    r"\b(?:you|your|yours|ignore|disregard|forget|respond|reply|answer|obey|follow|instructions?|prompt|rules|"
    r"must|always|never|assistant|model|override)\b",
    re.IGNORECASE,
)
_PROBE_ALTERNATIVES = "|".join(
    [
        r"\b(?:reveal|show|print|repeat|output|display|tell|give|leak|dump|recite|share|write\s+out|spell\s+out)\b"
        r"(?:\W+\w+){0,4}?\W+(?:system\s+(?:prompt|message|instructions?)|(?:initial|hidden|original|secret|full)"
        r"\s+(?:prompt|instructions?)|(?:your|the)\s+(?:prompt|instructions?|rules)(?:\s+above)?)\b",
        r"\bwhat\s+(?:are|were|is)\s+your\s+(?:instructions?|rules|prompt|system\s+prompt|guidelines)\b",
        r"\b(?:words|text|everything)\s+(?:above|before)\s+(?:this|the\s+(?:description|product))\b",
        r"\bsystem\s+prompt\b",
    ]
)
_PROBE = _gated(_PROBE_ALTERNATIVES, "degloprstw")
_SPACES = re.compile(r"[^\S\n]+")


def normalise(text: str) -> str:
    """NFKC, without zero-width characters, each run of spaces or tabs one space."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    return _SPACES.sub(" ", text)


def _phrase(phrase: str) -> str:
    words = [re.escape(w) for w in normalise(phrase).split()]
    return r"\s+".join(words)


@functools.lru_cache(maxsize=64)
def _blocklist(phrases: tuple[str, ...]) -> re.Pattern[str] | None:
    """A feature's whole blocklist as one pattern, built once per process: any of its phrases as
    whole words, case-insensitive (what searching for each in turn found), behind a look-ahead for
    the phrases' first characters. None for an empty blocklist."""
    words = [_phrase(p) for p in phrases if p.strip()]
    if not words:
        return None
    firsts = [normalise(p).split() for p in phrases if p.strip()]
    # A phrase of nothing but invisible characters has no first character (and matched anywhere
    # between two non-word characters, as it still does): then no look-ahead.
    leads = f"(?=[{''.join(sorted({re.escape(w[0][0]) for w in firsts}))}])" if all(firsts) else ""
    return re.compile(rf"{leads}(?<!\w)(?:{'|'.join(words)})(?!\w)", re.IGNORECASE)


def find_injection(text: str, blocklist: Iterable[str] = ()) -> tuple[str, ...]:
    """The signals ``text`` shows, in ``SIGNALS`` order; empty when it looks like plain data."""
    text = normalise(text)
    found: set[str] = set()
    if _OVERRIDE.search(text):
        found.add("instruction_override")
    if _ROLE_TOKENS.search(text) or any(_TO_THE_MODEL.search(m.group("rest")) for m in _ROLE_LINE.finditer(text)):
        found.add("role_marker")
    if _PROBE.search(text):
        found.add("prompt_probe")
    phrases = _blocklist(tuple(blocklist))
    if phrases is not None and phrases.search(text):
        found.add("blocklist")
    return tuple(s for s in SIGNALS if s in found)


SIGNAL_NAMES = {
    "instruction_override": "instructions aimed at the AI model",
    "role_marker": "chat role markers",
    "prompt_probe": "a probe for the model's own instructions",
    "blocklist": "a blocked phrase",
}


def describe_signals(signals: Iterable[str]) -> str:
    names = [SIGNAL_NAMES[s] for s in SIGNALS if s in set(signals)]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
