"""The golden set: the prompt templates' regression and cost gate (``genline golden``, docs/PROMPTS.md).

The set (``config/prompts/golden.json``) is a list of cases: a product description, a profile, and
checks on the copy the model writes for it (required fields, required phrases, length bounds in
characters, banned phrases). ``run_golden`` renders each case's copy prompt from the current
templates (``pipelines/prompts.py``, the same ``copy_messages`` the copy step sends), sends it
through the gateway to the provider (the simulator in CI) with the profile's first copy model and
token cap, checks the answer, and estimates what one pipeline of the case costs
(``pipelines/estimate.py``).

The gate fails when

- a check fails on a case's output (or the provider refuses a case's prompt);
- the estimated cost rises more than ``COST_TOLERANCE`` (10 %) over the committed baseline
  (``config/prompts/golden_baseline.json``), for a case or for the whole set. Two figures are
  gated: the pipeline's total and its copy step. The copy step is the part a template drives (its
  prompt tokens); at a few hundredths of a cent it is too small a share of a pipeline's total for a
  costlier template to move the total by 10 %, so it has a gate of its own;
- a template was edited in place: its name is the baseline's but its text is not (a change to what
  the model is told is a new file, ``copy.v2.txt``, so a stored output can say which one made it);
- a case has no baseline.

``write_baseline`` records the current figures on purpose (``genline golden --update``) and says
what changed. A cost that fell passes; the report suggests ``--update`` so the headroom does not
grow unseen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import genline.config
from genline.config.catalog import Catalog, Profile
from genline.config.clock import utcnow
from genline.config.errors import ConfigError, ProviderRejected
from genline.config.settings import Settings
from genline.pipelines import prompts
from genline.pipelines.estimate import estimate_pipeline
from genline.provider.client import ProviderClient
from genline.provider.gateway import CallContext, Gateway, MemoryAuditSink, RetryPolicy

PROMPTS_DIR = Path(genline.config.__file__).parent / "prompts"
GOLDEN_FILE = PROMPTS_DIR / "golden.json"
BASELINE_FILE = PROMPTS_DIR / "golden_baseline.json"
COST_TOLERANCE = Decimal("0.10")  # the most the estimated cost may rise over the baseline: +10 %
FEATURE = "golden"  # the feature the gateway's calls are made for (audit, budgets)
BASELINE_VERSION = 1
OUTPUT_FIELDS = ("model", "text", "headline", "tokens", "prompt")  # what required_fields may name
_CHECK_KEYS = {"required_fields", "required_phrases", "banned_phrases", "min_chars", "max_chars"}
_CASE_KEYS = _CHECK_KEYS | {"name", "profile", "description"}


# --- the set --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checks:
    required_fields: tuple[str, ...] = ()
    required_phrases: tuple[str, ...] = ()
    banned_phrases: tuple[str, ...] = ()
    min_chars: int = 0
    max_chars: int | None = None


@dataclass(frozen=True)
class Case:
    name: str
    profile: str
    description: str
    checks: Checks


@dataclass(frozen=True)
class GoldenSet:
    cases: tuple[Case, ...]
    source: str


def _strings(raw: Any, where: str, key: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"The golden set's {where} has a {key} that is not a list of non-empty strings.")
    return tuple(value)


def _length(raw: Any, where: str, key: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"The golden set's {where} has a {key} that is not a whole number of characters.")
    return value


def _checks(raw: Any, where: str, base: Checks) -> Checks:
    fields = _strings(raw, where, "required_fields")
    unknown = sorted(set(fields) - set(OUTPUT_FIELDS))
    if unknown:
        raise ConfigError(
            f"The golden set's {where} requires the field {unknown[0]!r}; the copy output's fields are "
            f"{', '.join(OUTPUT_FIELDS)}."
        )
    min_chars = _length(raw, where, "min_chars", base.min_chars)
    max_chars = _length(raw, where, "max_chars", base.max_chars)
    if min_chars is not None and max_chars is not None and min_chars > max_chars:
        raise ConfigError(f"The golden set's {where} has a min_chars over its max_chars.")
    return Checks(
        required_fields=tuple(dict.fromkeys(base.required_fields + fields)),
        required_phrases=tuple(dict.fromkeys(base.required_phrases + _strings(raw, where, "required_phrases"))),
        banned_phrases=tuple(dict.fromkeys(base.banned_phrases + _strings(raw, where, "banned_phrases"))),
        min_chars=min_chars or 0,
        max_chars=max_chars,
    )


def parse_set(raw: Any, catalog: Catalog, source: str = "golden set") -> GoldenSet:
    """Check a golden set's JSON; every problem is a ConfigError naming the case."""
    if not isinstance(raw, dict) or not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise ConfigError(f"The golden set {source} needs a non-empty 'cases' list.")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - _CHECK_KEYS:
        raise ConfigError(
            f"The golden set {source} has 'defaults' that are not checks ({', '.join(sorted(_CHECK_KEYS))})."
        )
    base = _checks(defaults, "defaults", Checks())
    cases: list[Case] = []
    for index, spec in enumerate(raw["cases"], start=1):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"Case {index} of the golden set {source} has no name.")
        where = f"case {name!r}"
        unknown = sorted(set(spec) - _CASE_KEYS)
        if unknown:
            raise ConfigError(f"The golden set's {where} has an unknown key {unknown[0]!r}.")
        if any(case.name == name for case in cases):
            raise ConfigError(f"The golden set {source} has two cases named {name!r}.")
        description, profile = spec.get("description"), spec.get("profile", "standard")
        if not isinstance(description, str) or not description.strip():
            raise ConfigError(f"The golden set's {where} has no description.")
        if profile not in catalog.profiles:
            raise ConfigError(f"The golden set's {where} names the profile {profile!r}, which the catalog lacks.")
        cases.append(Case(name=name, profile=profile, description=description, checks=_checks(spec, where, base)))
    return GoldenSet(cases=tuple(cases), source=source)


def load_set(catalog: Catalog, path: Path | None = None) -> GoldenSet:
    source = path or GOLDEN_FILE
    return parse_set(_read_json(source, "golden set"), catalog, str(source))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"The {what} file {path} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"The {what} file {path} cannot be read: {exc.strerror}.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"The {what} file {path} is not valid JSON (line {exc.lineno}).") from None


# --- the templates ----------------------------------------------------------------------------------
def templates() -> dict[str, dict[str, str]]:
    """The templates in use, by step: their name and a digest of their sections (comments excluded)."""
    out: dict[str, dict[str, str]] = {}
    for step, name in (("copy", prompts.COPY_PROMPT), ("image", prompts.IMAGE_PROMPT), ("video", prompts.VIDEO_PROMPT)):
        text = "\n".join(f"=== {role} ===\n{body.template}" for role, body in prompts.template(name))
        out[step] = {"name": name, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return out


# --- costs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """The estimated cost of one pipeline (or of the set, one pipeline a case), and of its copy step."""

    pipeline_usd: Decimal
    copy_usd: Decimal

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.pipeline_usd + other.pipeline_usd, self.copy_usd + other.copy_usd)

    def to_dict(self) -> dict[str, str]:
        return {"pipeline_usd": str(self.pipeline_usd), "copy_usd": str(self.copy_usd)}


ZERO = Cost(Decimal(0), Decimal(0))


def estimate_case(catalog: Catalog, case: Case, at: datetime) -> Cost:
    """What one pipeline of the case is estimated to cost on the profile's first-choice models, at
    the rates in effect at ``at`` (the copy step: its prompt's tokens plus the profile's token cap)."""
    estimate = estimate_pipeline(catalog, case.profile, description=case.description, at=at)
    copy = sum((step.cost_usd for step in estimate.steps if step.kind == "copy"), Decimal(0))
    return Cost(pipeline_usd=estimate.total_usd, copy_usd=copy)


def rise(now: Decimal, before: Decimal) -> Decimal | None:
    """How much ``now`` is over ``before``, as a fraction (0.25 = +25 %); None without a base."""
    return None if before <= 0 else (now - before) / before


def percent(fraction: Decimal | None) -> str:
    return "n/a" if fraction is None else f"{fraction * 100:+.1f}%"


def usd(value: Decimal) -> str:
    """Dollars with six to eight decimals (a copy step's cost moves in the seventh): ``$0.0002082``."""
    whole, _, decimals = f"{value:.8f}".partition(".")
    return f"${whole}.{decimals.rstrip('0').ljust(6, '0')}"


# --- the baseline -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    templates: dict[str, dict[str, str]]
    cases: dict[str, Cost]
    total: Cost
    priced_at: datetime  # the rates the figures were estimated at: a run compares at the same rates


def _cost(raw: Any, where: str, source: str) -> Cost:
    try:
        return Cost(Decimal(str(raw["pipeline_usd"])), Decimal(str(raw["copy_usd"])))
    except (KeyError, TypeError, InvalidOperation):
        raise ConfigError(
            f"The golden baseline {source} has no pipeline_usd and copy_usd figures for {where}."
        ) from None


def load_baseline(path: Path | None = None) -> Baseline:
    source = path or BASELINE_FILE
    raw = _read_json(source, "golden baseline")
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("cases"), dict)
        or not isinstance(raw.get("templates"), dict)
    ):
        raise ConfigError(
            f"The golden baseline {source} needs 'templates', 'cases' and 'total'; run genline golden --update."
        )
    cases = {str(name): _cost(spec, f"case {name!r}", str(source)) for name, spec in raw["cases"].items()}
    try:
        priced_at = datetime.fromisoformat(str(raw["priced_at"]))
    except (KeyError, ValueError):
        raise ConfigError(
            f"The golden baseline {source} has no valid priced_at time; run genline golden --update."
        ) from None
    if priced_at.tzinfo is None:
        raise ConfigError(f"The golden baseline {source} has a priced_at time without its UTC offset.")
    return Baseline(
        templates=raw["templates"],
        cases=cases,
        total=_cost(raw.get("total"), "the total", str(source)),
        priced_at=priced_at,
    )


# --- a run ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    check: str  # required_field | required_phrase | banned_phrase | min_chars | max_chars | provider_rejected
    #             | cost_rise | template_edited | no_baseline
    message: str
    case: str | None = None  # None: the set as a whole

    def to_dict(self) -> dict[str, str | None]:
        return {"case": self.case, "check": self.check, "message": self.message}


@dataclass
class CaseResult:
    case: Case
    model: str
    output: dict[str, Any]
    cost: Cost
    baseline: Cost | None
    failures: list[Failure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.case.name,
            "profile": self.case.profile,
            "model": self.model,
            "passed": self.passed,
            "chars": len(str(self.output.get("text", ""))),
            "output": self.output,
            "estimated": self.cost.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "rise": {
                "pipeline": percent(rise(self.cost.pipeline_usd, self.baseline.pipeline_usd))
                if self.baseline
                else None,
                "copy": percent(rise(self.cost.copy_usd, self.baseline.copy_usd)) if self.baseline else None,
            },
            "failures": [f.to_dict() for f in self.failures],
        }


@dataclass
class Result:
    cases: list[CaseResult]
    templates: dict[str, dict[str, str]]
    total: Cost
    priced_at: datetime
    baseline_total: Cost | None  # the baseline's figures for the cases it shares with this run
    failures: list[Failure] = field(default_factory=list)  # the set's own (total cost, templates)
    notes: list[str] = field(default_factory=list)  # what passes but is worth knowing

    @property
    def all_failures(self) -> list[Failure]:
        return [f for c in self.cases for f in c.failures] + self.failures

    @property
    def passed(self) -> bool:
        return not self.all_failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": percent(COST_TOLERANCE),
            "priced_at": self.priced_at.isoformat(),
            "templates": self.templates,
            "estimated_total": self.total.to_dict(),
            "baseline_total": self.baseline_total.to_dict() if self.baseline_total else None,
            "cases": [c.to_dict() for c in self.cases],
            "failures": [f.to_dict() for f in self.all_failures],
            "notes": self.notes,
        }


def gateway_for(settings: Settings, catalog: Catalog) -> Gateway:
    """The gateway the set's calls go through: the real client and retries, audited in memory
    (a golden run is no user's work: it books nothing in the database)."""
    retry = RetryPolicy(
        max_attempts=settings.provider_max_attempts,
        base_s=settings.provider_backoff_s,
        cap_s=settings.provider_backoff_cap_s,
    )
    return Gateway(catalog, MemoryAuditSink(), client=ProviderClient(settings), retry=retry)


def run_case(gateway: Gateway, profile: Profile, case: Case) -> tuple[str, dict[str, Any], list[Failure]]:
    """Send the case's copy prompt as the copy step does; the output as the step stores it, and the
    checks it fails. A prompt the provider refuses (400) is a failure of the case; any other
    provider error is raised (the run cannot judge the templates)."""
    model = profile.copy_models[0]
    messages = prompts.copy_messages(case.description)
    try:
        answer = gateway.chat(CallContext(feature=FEATURE, model=model), messages, max_tokens=profile.copy_max_tokens)
    except ProviderRejected as err:
        return (
            model,
            {},
            [
                Failure(
                    "provider_rejected", f"case {case.name}: the provider refused the prompt ({err.code}).", case.name
                )
            ],
        )
    text = answer.text
    output: dict[str, Any] = {
        "model": model,
        "text": text,
        "headline": next((line.strip() for line in text.splitlines() if line.strip()), ""),
        "tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt": prompts.COPY_PROMPT,
    }
    return model, output, check_output(case, output)


def check_output(case: Case, output: dict[str, Any]) -> list[Failure]:
    checks, name = case.checks, case.name
    text = str(output.get("text", ""))
    lowered = text.casefold()
    failures = [
        Failure("required_field", f"case {name}: the copy output has no {f}.", name)
        for f in checks.required_fields
        if output.get(f) in (None, "", 0)
    ]
    failures += [
        Failure("required_phrase", f"case {name}: the copy does not contain the required phrase {p!r}.", name)
        for p in checks.required_phrases
        if p.casefold() not in lowered
    ]
    failures += [
        Failure("banned_phrase", f"case {name}: the copy contains the banned phrase {p!r}.", name)
        for p in checks.banned_phrases
        if p.casefold() in lowered
    ]
    if len(text) < checks.min_chars:
        failures.append(
            Failure(
                "min_chars",
                f"case {name}: the copy is {len(text)} characters, under the minimum of {checks.min_chars}.",
                name,
            )
        )
    if checks.max_chars is not None and len(text) > checks.max_chars:
        failures.append(
            Failure(
                "max_chars",
                f"case {name}: the copy is {len(text)} characters, over the maximum of {checks.max_chars}.",
                name,
            )
        )
    return failures


def _cost_failures(what: str, case: str | None, now: Cost, before: Cost) -> list[Failure]:
    out = []
    for label, a, b in (
        ("pipeline", now.pipeline_usd, before.pipeline_usd),
        ("copy step", now.copy_usd, before.copy_usd),
    ):
        up = rise(a, b)
        if up is not None and up > COST_TOLERANCE:
            out.append(
                Failure(
                    "cost_rise",
                    f"{what}: the estimated {label} cost rose {percent(up)} over the baseline "
                    f"({usd(b)} → {usd(a)}), more than the {percent(COST_TOLERANCE)} allowed.",
                    case,
                )
            )
    return out


def run_golden(golden: GoldenSet, gateway: Gateway, catalog: Catalog, baseline: Baseline | None) -> Result:
    """Run every case, check its output, estimate its cost and compare with the baseline.

    Costs are estimated at the rates in effect when the baseline was recorded, so a price the
    catalog schedules for a later date does not fail CI on that date with nothing changed; without
    a baseline (``--update``), at today's rates."""
    at = baseline.priced_at if baseline else utcnow().replace(microsecond=0)
    cases: list[CaseResult] = []
    for case in golden.cases:
        model, output, failures = run_case(gateway, catalog.profiles[case.profile], case)
        cost = estimate_case(catalog, case, at)
        before = baseline.cases.get(case.name) if baseline else None
        if baseline is not None and before is None:
            failures.append(
                Failure(
                    "no_baseline",
                    f"case {case.name} has no baseline: record one with genline golden --update.",
                    case.name,
                )
            )
        elif before is not None:
            failures += _cost_failures(f"case {case.name}", case.name, cost, before)
        cases.append(CaseResult(case, model, output, cost, before, failures))
    current = templates()
    result = Result(
        cases=cases, templates=current, total=sum((c.cost for c in cases), ZERO), priced_at=at, baseline_total=None
    )
    if baseline is None:
        return result
    shared = [c for c in cases if c.baseline is not None]
    if shared:
        now = sum((c.cost for c in shared), ZERO)
        before = sum((c.baseline for c in shared if c.baseline), ZERO)
        result.baseline_total = before
        result.failures += _cost_failures("the golden set", None, now, before)
        if now.pipeline_usd < before.pipeline_usd * (1 - COST_TOLERANCE) or now.copy_usd < before.copy_usd * (
            1 - COST_TOLERANCE
        ):
            result.notes.append(
                "The estimated cost fell more than 10% below the baseline: record it with genline golden --update."
            )
    for step, now_t in current.items():
        then = baseline.templates.get(step)
        if not isinstance(then, dict):
            continue
        if then.get("name") == now_t["name"] and then.get("sha256") != now_t["sha256"]:
            result.failures.append(
                Failure(
                    "template_edited",
                    f"The {step} template {now_t['name']} differs from the one the baseline recorded: a change to "
                    f"a template is a new file ({_next_version(now_t['name'])}.txt) and a new name in "
                    "pipelines/prompts.py.",
                )
            )
        elif then.get("name") != now_t["name"]:
            result.notes.append(f"The {step} template is now {now_t['name']} (the baseline has {then.get('name')}).")
    dropped = sorted(set(baseline.cases) - {c.case.name for c in cases})
    if dropped:
        result.notes.append(f"The baseline has cases the set no longer holds: {', '.join(dropped)}.")
    return result


def _next_version(name: str) -> str:
    stem, _, version = name.rpartition(".v")
    return f"{stem}.v{int(version) + 1}" if stem and version.isdigit() else f"{name}.v2"


# --- updating the baseline --------------------------------------------------------------------------
def baseline_document(result: Result) -> dict[str, Any]:
    return {
        "about": "The golden set's committed cost baseline (docs/PROMPTS.md): the estimated cost of one pipeline "
        "per case and for the set, and the templates they were estimated with. Rewritten on purpose by "
        "genline golden --update; CI fails when the estimate rises more than 10% over it.",
        "version": BASELINE_VERSION,
        "tolerance": str(COST_TOLERANCE),
        "priced_at": result.priced_at.isoformat(),
        "templates": result.templates,
        "cases": {c.case.name: {"profile": c.case.profile, **c.cost.to_dict()} for c in result.cases},
        "total": result.total.to_dict(),
    }


def write_baseline(result: Result, previous: Baseline | None, path: Path | None = None) -> list[str]:
    """Write the run's figures as the new baseline; one line per change, for people."""
    target = path or BASELINE_FILE
    try:
        target.write_text(json.dumps(baseline_document(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"The golden baseline file {target} cannot be written: {exc.strerror}.") from None
    if previous is None:
        return [f"Recorded a new baseline of {len(result.cases)} cases: {usd(result.total.pipeline_usd)} for the set."]
    changes = []
    for step, now_t in result.templates.items():
        then = previous.templates.get(step) or {}
        if then.get("name") != now_t["name"] or then.get("sha256") != now_t["sha256"]:
            changes.append(f"{step} template: {then.get('name', 'none')} → {now_t['name']}")
    for c in result.cases:
        before = previous.cases.get(c.case.name)
        if before is None:
            changes.append(f"case {c.case.name}: new, {usd(c.cost.pipeline_usd)} (copy {usd(c.cost.copy_usd)})")
        elif before != c.cost:
            changes.append(
                f"case {c.case.name}: {usd(before.pipeline_usd)} → {usd(c.cost.pipeline_usd)} "
                f"(copy {usd(before.copy_usd)} → {usd(c.cost.copy_usd)}, "
                f"{percent(rise(c.cost.copy_usd, before.copy_usd))})"
            )
    for name in sorted(set(previous.cases) - {c.case.name for c in result.cases}):
        changes.append(f"case {name}: removed")
    if previous.total != result.total:
        changes.append(
            f"set total: {usd(previous.total.pipeline_usd)} → {usd(result.total.pipeline_usd)} "
            f"({percent(rise(result.total.pipeline_usd, previous.total.pipeline_usd))}); copy "
            f"{usd(previous.total.copy_usd)} → {usd(result.total.copy_usd)} "
            f"({percent(rise(result.total.copy_usd, previous.total.copy_usd))})"
        )
    return changes or ["Nothing changed: the baseline already held these figures."]
