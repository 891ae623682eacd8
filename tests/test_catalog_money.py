"""Money in the catalog: dated prices (a price change never reprices history), batch rates, the
caps an operator writes, and a plain sentence naming what is wrong with a bad catalog.

The gateway tests run real calls against the simulator over loopback and read what the audit
records; dates are chosen days away from now, so no test depends on the time of day."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from genline.config.catalog import BUILTIN_CATALOG, Cap, Catalog, load_catalog, parse_catalog
from genline.config.clock import utcnow
from genline.config.errors import ConfigError
from genline.config.settings import Settings
from genline.pipelines.prompts import copy_messages
from genline.provider.client import ProviderClient
from genline.provider.gateway import CallContext, CallRecord, Gateway, MemoryAuditSink
from genline.provider.poll_client import HttpTaskReader
from genline.provider.pricing import call_cost_bound, prompt_tokens
from genline.provider.simulator import SimulatorHandle
from genline.provider.simulator.media import approx_tokens

SHIPPED: dict[str, Any] = json.loads(BUILTIN_CATALOG.read_text())
DAY = timedelta(days=1)
VIDEO = {"model": "minimax-hailuo-2.3", "prompt": "mug", "duration": 6, "aspect_ratio": "16:9", "resolution": "768p"}


def catalog_with(**sections: Any) -> dict[str, Any]:
    """The shipped catalog as JSON, with top-level sections replaced."""
    return {**copy.deepcopy(SHIPPED), **sections}


def with_model(name: str, spec: Any) -> dict[str, Any]:
    raw = copy.deepcopy(SHIPPED)
    raw["models"][name] = spec
    return raw


# --- dated prices ----------------------------------------------------------------------------------
CHANGE = {
    "kind": "video",
    "max_duration_s": 10,
    "prices": [
        {"effective_from": "2026-03-01", "per_second_usd": 0.05},
        {"effective_from": "2025-01-01", "per_second_usd": 0.02, "batch_per_second_usd": 0.01},
    ],
}


def test_the_price_in_effect_is_the_newest_entry_not_after_the_calls_time() -> None:
    catalog = parse_catalog(with_model("minimax-hailuo-2.3", CHANGE))
    before = datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC)
    at = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    after = datetime(2026, 7, 1, tzinfo=UTC)
    assert catalog.model("minimax-hailuo-2.3", before).media_cost(6) == Decimal("0.12")
    assert catalog.model("minimax-hailuo-2.3", at).media_cost(6) == Decimal("0.30")
    assert catalog.model("minimax-hailuo-2.3", after).media_cost(6) == Decimal("0.30")
    # Older than every entry: the first one (the model has no flat rates to fall back on).
    assert catalog.model("minimax-hailuo-2.3", datetime(2020, 1, 1, tzinfo=UTC)).per_second_usd == Decimal("0.02")
    # Another zone's local time is read as the UTC instant it is.
    tokyo = datetime(2026, 3, 1, 8, 0, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    assert catalog.model("minimax-hailuo-2.3", tokyo).per_second_usd == Decimal("0.05")
    assert catalog.model("minimax-hailuo-2.3").max_duration_s == 10


def test_flat_rates_are_the_entry_from_the_beginning_of_time() -> None:
    spec = {"kind": "image", "per_image_usd": 0.03, "prices": [{"effective_from": "2026-06-01", "per_image_usd": 0.04}]}
    catalog = parse_catalog(with_model("wan-2.7-image", spec))
    assert catalog.model("wan-2.7-image", datetime(1999, 1, 1, tzinfo=UTC)).per_image_usd == Decimal("0.03")
    assert catalog.model("wan-2.7-image", datetime(2026, 5, 31, tzinfo=UTC)).per_image_usd == Decimal("0.03")
    assert catalog.model("wan-2.7-image", datetime(2026, 6, 1, tzinfo=UTC)).per_image_usd == Decimal("0.04")


def test_batch_work_costs_the_batch_rate_where_there_is_one_else_the_normal_rate() -> None:
    chat = {
        "kind": "chat",
        "input_per_million_usd": 1,
        "output_per_million_usd": 2,
        "batch_output_per_million_usd": 1,
    }
    catalog = parse_catalog(with_model("cheap-chat", chat))
    price = catalog.model("cheap-chat")
    assert price.chat_cost(1_000_000, 1_000_000) == Decimal(3)
    assert price.chat_cost(1_000_000, 1_000_000, batch=True) == Decimal(2)  # input has no batch rate: normal
    shipped = load_catalog()
    assert shipped.model("kling-v3-omni").media_cost(10, batch=True) == Decimal("0.3360")
    assert shipped.model("kling-v3-omni").media_cost(10) == Decimal("0.6720")
    assert shipped.model("wan-2.7-image").media_cost(1, batch=True) == Decimal("0.0108")
    assert shipped.model("gpt-4o-mini").chat_cost(1000, 1000, batch=True) == Decimal("0.00075")  # no batch rate


def test_the_shipped_catalog_keeps_todays_rates_halves_media_for_batch_and_has_no_caps() -> None:
    catalog = load_catalog()
    rates = {
        "wan-2.7-image": ("per_image_usd", "0.0216"),
        "minimax-hailuo-2.3": ("per_second_usd", "0.025"),
        "kling-v3-omni": ("per_second_usd", "0.0672"),
        "vidu-q3-pro": ("per_second_usd", "0.12"),
    }
    for name, (rate, value) in rates.items():
        price = catalog.model(name)
        assert getattr(price, rate) == Decimal(value)
        assert getattr(price, f"batch_{rate}") * 2 == Decimal(value)
        assert len(catalog.models[name].prices) >= 1 and price.effective_from is not None
    assert catalog.caps == ()


# --- the gateway prices each call at its own time -------------------------------------------------
@pytest.fixture
def gateway_for(
    sim: SimulatorHandle, make_settings: Callable[..., Settings]
) -> Iterator[Callable[[Catalog], tuple[Gateway, MemoryAuditSink, Settings]]]:
    made: list[Gateway] = []

    def make(catalog: Catalog, stages: Any = ()) -> tuple[Gateway, MemoryAuditSink, Settings]:
        settings = make_settings(sim.base_url)
        audit = MemoryAuditSink()
        gateway = Gateway(catalog, audit, client=ProviderClient(settings), stages=stages, sleep=lambda s: None)
        made.append(gateway)
        return gateway, audit, settings

    yield make
    for gateway in made:
        gateway.close()


def _changing_chat_catalog() -> Catalog:
    """gpt-4o-mini at $1/$2 per million until yesterday, $10/$20 since, $100/$200 from in two days."""
    today = utcnow().date()
    spec = {
        "kind": "chat",
        "input_per_million_usd": 1,
        "output_per_million_usd": 2,
        "prices": [
            {"effective_from": (today - DAY).isoformat(), "input_per_million_usd": 10, "output_per_million_usd": 20},
            {
                "effective_from": (today + 2 * DAY).isoformat(),
                "input_per_million_usd": 100,
                "output_per_million_usd": 200,
            },
        ],
    }
    return parse_catalog(with_model("gpt-4o-mini", spec))


def test_a_call_is_priced_at_the_rates_in_effect_when_it_was_made_and_never_repriced(
    gateway_for: Callable[..., tuple[Gateway, MemoryAuditSink, Settings]],
) -> None:
    catalog = _changing_chat_catalog()
    gateway, audit, _ = gateway_for(catalog)
    gateway.chat(CallContext("u", "f", "pl", "st", "gpt-4o-mini"), copy_messages("A mug"), max_tokens=50)
    (record,) = audit.records
    assert record.prompt_tokens and record.completion_tokens
    now = (Decimal(10) * record.prompt_tokens + Decimal(20) * record.completion_tokens) / 1_000_000
    assert record.cost_usd == now
    # The same usage two days back was priced at the rates of then; what is recorded stays as it was.
    then = catalog.model("gpt-4o-mini", record.ts - 2 * DAY)
    assert then.chat_cost(record.prompt_tokens, record.completion_tokens) == now / 10
    assert catalog.model("gpt-4o-mini", record.ts + 3 * DAY).chat_cost(1, 0) == Decimal("0.0001")
    assert record.cost_usd == now  # a later price in the catalog changes no record


class SeesBound:
    """A stage that notes the cost bound each call carries when the stages run."""

    def __init__(self) -> None:
        self.bounds: list[tuple[str, Decimal | None]] = []

    def before(self, ctx: CallContext, operation: str) -> None:
        self.bounds.append((operation, ctx.cost_bound_usd))

    def after(self, record: CallRecord, error: Any) -> None:
        return None


def test_the_stages_see_each_calls_cost_bound_and_batch_work_is_priced_at_batch_rates(
    gateway_for: Callable[..., tuple[Gateway, MemoryAuditSink, Settings]],
) -> None:
    stage = SeesBound()
    catalog = load_catalog()
    gateway, audit, settings = gateway_for(catalog, [stage])
    messages = copy_messages("A mug")
    gateway.chat(CallContext("u", "f", "pl", "st", "gpt-4o-mini"), messages, max_tokens=50)
    chat = audit.records[-1]
    bound = catalog.model("gpt-4o-mini").chat_cost(prompt_tokens(messages), 50)
    assert stage.bounds[-1] == ("chat", bound) and chat.cost_usd <= bound
    ctx = CallContext("u", "f", "pl", "st", "minimax-hailuo-2.3", batch=True)
    job = gateway.submit(ctx, "video", VIDEO, "money-key-1")
    assert stage.bounds[-1] == ("submit", Decimal("0.0750"))  # 6 s at the batch rate, $0.0125 a second

    async def poll() -> None:
        poller = Gateway(catalog, audit, async_client=HttpTaskReader(settings))
        state = await poller.poll(ctx, job.task_id, units=6)
        assert state.status == "completed"
        await poller.aclose()

    asyncio.run(poll())
    assert audit.records[-1].cost_usd == Decimal("0.0750")


def test_the_prompt_estimate_is_at_or_a_little_above_what_the_simulator_bills() -> None:
    for description in ("", "Hand-thrown stoneware mug, speckled glaze, 350 ml.", "x" * 2000):
        messages = copy_messages(description)
        billed = approx_tokens("\n".join(m["content"] for m in messages))
        assert billed <= prompt_tokens(messages) <= billed + 10
    price = load_catalog().model("minimax-hailuo-2.3")
    assert call_cost_bound(price, units=4) == Decimal("0.100")
    with pytest.raises(ValueError, match="units"):
        call_cost_bound(price)


# --- caps ------------------------------------------------------------------------------------------
def test_caps_parse_and_describe_themselves() -> None:
    caps = [
        {"scope": "global", "period": "day", "limit_usd": 50},
        {"scope": "user", "match": "*", "period": "day", "limit_usd": "5"},
        {"scope": "feature", "match": "listing-video", "period": "month", "limit_usd": 100},
        {"scope": "user", "match": "seller-9", "period": "month", "limit_usd": 0.125},
    ]
    catalog = parse_catalog(catalog_with(caps=caps))
    glob, per_user, feature, one_user = catalog.caps
    assert glob == Cap("global", "*", "day", Decimal(50))
    assert per_user == Cap("user", "*", "day", Decimal(5))
    assert [c.describe() for c in catalog.caps] == [
        "the global daily cap of $50.00",
        "the daily cap of $5.00 per user",
        "the monthly cap of $100.00 for feature 'listing-video'",
        "the monthly cap of $0.125 for user 'seller-9'",
    ]
    assert glob.applies("a", "b") and glob.subject("a", "b") == "*"
    assert per_user.applies("a", "b") and per_user.subject("a", "b") == "a"
    assert feature.applies("a", "listing-video") and not feature.applies("a", "other")
    assert feature.subject("a", "listing-video") == "listing-video"
    assert one_user.applies("seller-9", "x") and not one_user.applies("seller-1", "x")
    assert Cap("feature", "*", "month", Decimal(1)).subject("u", "f") == "f"
    assert parse_catalog(catalog_with(caps=[])).caps == ()
    raw = catalog_with()
    raw.pop("caps", None)
    assert parse_catalog(raw).caps == ()


@pytest.mark.parametrize(
    ("cap", "sentence"),
    [
        ({"scope": "user", "period": "week", "limit_usd": 5}, "Catalog cap 2 has period 'week'; use day or month."),
        (
            {"scope": "team", "period": "day", "limit_usd": 5},
            "Catalog cap 2 has scope 'team'; use global, user or feature.",
        ),
        ({"scope": "user", "period": "day", "limit_usd": 0}, "Catalog cap 2 has limit_usd 0; it must be a number"),
        ({"scope": "user", "period": "day", "limit_usd": -3}, "Catalog cap 2 has limit_usd -3;"),
        ({"scope": "user", "period": "day", "limit_usd": "lots"}, "Catalog cap 2 has limit_usd 'lots';"),
        ({"scope": "user", "period": "day", "limit_usd": True}, "Catalog cap 2 has limit_usd True;"),
        ({"scope": "user", "period": "day"}, "Catalog cap 2 has limit_usd None;"),
        ({"scope": "global", "match": "u1", "period": "day", "limit_usd": 5}, "Catalog cap 2 is global, so its match"),
        ({"scope": "user", "period": "day", "limit_usd": 5, "per": "x"}, "Catalog cap 2 has an unknown setting 'per'"),
        ({"scope": "user", "match": "", "period": "day", "limit_usd": 5}, "Catalog cap 2 has match ''"),
        ("5 a day", "Catalog cap 2 is not an object"),
        ({"scope": "global", "period": "day", "limit_usd": 9}, "Catalog caps 1 and 2 both cap all spending by the day"),
    ],
)
def test_a_cap_that_does_not_parse_stops_start_up_naming_it(cap: Any, sentence: str) -> None:
    raw = catalog_with(caps=[{"scope": "global", "period": "day", "limit_usd": 50}, cap])
    with pytest.raises(ConfigError) as info:
        parse_catalog(raw)
    assert info.value.message.startswith(sentence) and info.value.message.endswith(".")


# --- a bad catalog stops start-up with a sentence naming the model and the field --------------------
BAD_MODELS = [
    ({"kind": "video", "per_second_usd": -0.1}, "Catalog model 'm' has a negative per_second_usd (-0.1)"),
    (
        {"kind": "video", "per_second_usd": "cheap"},
        "Catalog model 'm' has per_second_usd 'cheap', which is not a number",
    ),
    ({"kind": "video", "per_second_usd": True}, "Catalog model 'm' has per_second_usd True, which is not a number"),
    ({"kind": "video", "per_second_usd": None}, "Catalog model 'm' has per_second_usd None, which is not a number"),
    ({"kind": "video", "per_second_usd": "NaN"}, "Catalog model 'm' has per_second_usd 'NaN', which is not a number"),
    ({"kind": "video"}, "Catalog model 'm' has no price"),
    ({"kind": "chat", "input_per_million_usd": 1}, "Catalog model 'm' has no output_per_million_usd; a chat model"),
    ({"kind": "image", "per_second_usd": 1}, "Catalog model 'm' is an image model, so per_second_usd does not apply"),
    ({"kind": "video", "per_secnd_usd": 1}, "Catalog model 'm' has an unknown setting 'per_secnd_usd'"),
    ({"kind": "video", "per_second_usd": 1, "max_duration_s": 0}, "Catalog model 'm' has max_duration_s 0"),
    ({"kind": "movie", "per_second_usd": 1}, "Catalog model 'm' needs a kind of chat, image or video"),
    ({"kind": "video", "prices": []}, "Catalog model 'm' has 'prices' that is not a non-empty list"),
    ({"kind": "video", "prices": ["x"]}, "Catalog model 'm' price 1 is not an object"),
    (
        {"kind": "video", "prices": [{"per_second_usd": 1}]},
        "Catalog model 'm' price 1 needs an effective_from date",
    ),
    (
        {"kind": "video", "prices": [{"effective_from": "01/03/2026", "per_second_usd": 1}]},
        "Catalog model 'm' price 1 has effective_from '01/03/2026', which is not an ISO date",
    ),
    (
        {"kind": "video", "prices": [{"effective_from": "2026-02-30", "per_second_usd": 1}]},
        "Catalog model 'm' price 1 has effective_from '2026-02-30', which is not an ISO date",
    ),
    (
        {
            "kind": "video",
            "prices": [
                {"effective_from": "2026-01-01", "per_second_usd": 1},
                {"effective_from": "2026-01-01", "per_second_usd": 2},
            ],
        },
        "Catalog model 'm' prices 1 and 2 are both effective from 2026-01-01",
    ),
    (
        {"kind": "video", "prices": [{"effective_from": "2026-01-01", "per_second_usd": 1, "kind": "video"}]},
        "Catalog model 'm' price 1 has an unknown setting 'kind'",
    ),
    (
        {
            "kind": "video",
            "prices": [{"effective_from": "2026-01-01", "batch_per_second_usd": -1, "per_second_usd": 1}],
        },
        "Catalog model 'm' has a negative batch_per_second_usd (-1) (price 1)",
    ),
    (
        {"kind": "video", "prices": [{"effective_from": "2026-01-01"}]},
        "Catalog model 'm' has no per_second_usd (price 1); a video model needs one",
    ),
]


@pytest.mark.parametrize(("spec", "sentence"), BAD_MODELS)
def test_a_bad_price_stops_start_up_with_a_sentence_naming_the_model(spec: Any, sentence: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_catalog(with_model("m", spec))
    assert info.value.message.startswith(sentence) and info.value.message.endswith(".")


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (
            lambda raw: raw["profiles"]["draft"].update(video_models=["sora-99"]),
            "Catalog profile 'draft' lists 'sora-99' in video_models, but the catalog has no video model",
        ),
        (
            lambda raw: raw["profiles"]["draft"].update(copy_max_tokens=0),
            "Catalog profile 'draft' has copy_max_tokens 0",
        ),
        (
            lambda raw: raw["profiles"]["draft"].update(video_duration_s=30),
            "Catalog profile 'draft' asks 30 s of video",
        ),
        (lambda raw: raw.update(budgets={}), "The catalog catalog has an unknown section 'budgets'"),
        (lambda raw: raw.update(caps={"limit_usd": 5}), "The catalog catalog has a 'caps' section that is not a list"),
        (
            lambda raw: raw["features"]["default"].update(profiles=["gold"]),
            "Catalog feature 'default' allows profile 'gold', which the catalog does not have",
        ),
        (
            lambda raw: raw["features"]["listing-video"].update(profiles="premium"),
            "Catalog feature 'listing-video' has profiles that are not a non-empty list",
        ),
        (
            lambda raw: raw["features"]["listing-video"].update(models="yes"),
            "Catalog feature 'listing-video' has models 'yes'; use true or false",
        ),
    ],
)
def test_a_bad_profile_section_or_feature_stops_start_up_naming_it(
    change: Callable[[dict[str, Any]], None], sentence: str
) -> None:
    raw = catalog_with()
    change(raw)
    with pytest.raises(ConfigError) as info:
        parse_catalog(raw)
    assert info.value.message.startswith(sentence) and info.value.message.endswith(".")


def test_a_catalog_file_with_a_bad_price_stops_the_runtime(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    from genline.pipelines.runtime import Runtime

    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(with_model("kling-v3-omni", {"kind": "video", "per_second_usd": -1})))
    with pytest.raises(ConfigError, match="Catalog model 'kling-v3-omni' has a negative per_second_usd"):
        Runtime.from_settings(make_settings(GENLINE_CATALOG_FILE=str(path)))
