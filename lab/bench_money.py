"""Money figures for ``make bench``: ``cache_hit_rate`` and ``estimate_error_p95``.

N pipelines run in this process in drain mode on the zero-setup footprint (SQLite, local files,
the database as shared state and copy cache) against the provider simulator in its own process,
with the shipped settings and catalog. The workload: 60% of the copy requests repeat an earlier
one (the same description on the same profile, so the same model, prompt and parameters); the
rest are new, spread over the catalog's profiles.

- ``cache_hit_rate`` = copy steps answered from the copy cache ÷ copy steps that succeeded
  (audit rows with ``cache_hit``), target ≥ 0.5. With every repeat a hit it equals the repeat share.
- ``estimate_error_p95`` = p95, over the succeeded pipelines, of
  |pipelines.estimated_cost_usd − pipelines.cost_usd| ÷ cost_usd, target ≤ 0.10.

Counts come with them (pipelines, succeeded, copy steps, hits, the chat calls the simulator
answered). ``python -m lab.bench_money`` runs it alone and prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from lab.bench_poller import quantile
from lab.bench_sim import SimProcess

# target of each figure, as lab/bench.py's TARGETS: (comparison, value)
TARGETS: dict[str, tuple[str, float]] = {
    "cache_hit_rate": (">=", 0.5),
    "estimate_error_p95": ("<=", 0.10),
}
REPEAT_SHARE = 0.6
FEATURE = "bench"  # not in the catalog: the default feature's policy and profiles
# renders finish at their first poll; the rate limit out of the way: the figures are about money
SIM_CONFIG: dict[str, Any] = {
    "image_seconds": 0.0,
    "video_seconds": 0.0,
    "video_bytes": 65536,
    "rate_limit_per_s": 10**6,
}
_GOODS = ("stoneware mug", "linen apron", "walnut board", "wool scarf", "brass lamp", "leather wallet", "glass vase")
_COLOURS = ("speckled white", "indigo", "forest green", "charcoal", "amber", "terracotta")


def workload(n: int, profiles: list[str], *, repeat_share: float = REPEAT_SHARE, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` requests, ``round(repeat_share * n)`` of which repeat an earlier one's copy request
    (its description and profile); the others are new, their profiles taken in turn."""
    from genline.provider.simulator.media import png_bytes

    rng = random.Random(seed)
    repeats = set(rng.sample(range(1, n), min(max(n - 1, 0), round(repeat_share * n))))
    image = png_bytes(b"bench-money", 32)
    run = uuid.uuid4().hex[:8]
    originals: list[tuple[str, str]] = []
    requests = []
    for i in range(n):
        if i in repeats:
            description, profile = rng.choice(originals)
        else:
            k = len(originals)
            goods, colour = _GOODS[k % len(_GOODS)], _COLOURS[(k // len(_GOODS)) % len(_COLOURS)]
            description, profile = f"Bench product {k}: a hand-made {goods} in {colour}.", profiles[k % len(profiles)]
            originals.append((description, profile))
        requests.append(
            {
                "user_id": f"bench-{i % 10}",
                "feature": FEATURE,
                "description": description,
                "profile": profile,
                "image": image,
                "idempotency_key": f"money-{run}-{i}",
            }
        )
    return requests


@contextlib.contextmanager
def _runtime(sim_url: str, key: str, var: Path) -> Iterator[Any]:
    """A drain-mode runtime on the shipped defaults (SQLite, local files, the embedded broker's
    footprint), with the simulator as the provider."""
    from genline.config.settings import load_settings
    from genline.pipelines.runtime import Runtime
    from genline.storage.migrate import upgrade

    settings = load_settings(
        {
            "GENLINE_VAR_DIR": str(var),
            "APIMART_BASE_URL": sim_url,
            "APIMART_API_KEY": key,
            "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator, on loopback
            "GENLINE_POLL_INTERVAL_S": "0.001",  # drain mode: a job is due as soon as it is submitted
            "GENLINE_LOG_LEVEL": "WARNING",
        }
    )
    upgrade(settings.database_url)
    rt = Runtime.from_settings(settings)  # the in-memory dispatcher: drain mode
    try:
        yield rt
    finally:
        rt.close()


def _figures(rt: Any) -> dict[str, float | int]:
    from sqlalchemy import func, select

    from genline.config.constants import PipelineStatus, StepKind, StepStatus
    from genline.storage.models import Pipeline, ProviderCall, Step

    with rt.db.transaction() as s:
        pipelines = s.scalar(select(func.count()).select_from(Pipeline)) or 0
        copy_steps = (
            s.scalar(
                select(func.count())
                .select_from(Step)
                .where(Step.kind == StepKind.COPY, Step.status == StepStatus.SUCCEEDED)
            )
            or 0
        )
        hits = (
            s.scalar(
                select(func.count())
                .select_from(ProviderCall)
                .where(ProviderCall.operation == "chat", ProviderCall.cache_hit.is_(True))
            )
            or 0
        )
        costs = s.execute(
            select(Pipeline.estimated_cost_usd, Pipeline.cost_usd).where(Pipeline.status == PipelineStatus.SUCCEEDED)
        ).all()
    errors = [float(abs(Decimal(est) - Decimal(act)) / Decimal(act)) for est, act in costs if act > 0]
    return {
        "cache_hit_rate": round(hits / copy_steps, 4) if copy_steps else float("nan"),
        "estimate_error_p95": round(quantile(errors, 0.95), 4),
        "estimate_error_p50": round(quantile(errors, 0.5), 4),
        "estimate_error_max": round(max(errors), 4) if errors else float("nan"),
        "money_pipelines": pipelines,
        "money_pipelines_succeeded": len(costs),
        "money_zero_cost_pipelines": len(costs) - len(errors),
        "copy_steps": copy_steps,
        "copy_cache_hits": hits,
    }


def run_money_section(
    pipelines: int = 100,
    *,
    repeat_share: float = REPEAT_SHARE,
    seed: int = 7,
    log_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float | int]:
    """Run the workload (module docstring) and return the figures and their counts. Everything it
    writes is in a temporary folder, removed at the end; the simulator's log goes to ``log_dir``."""
    from genline.pipelines.api import Genline
    from genline.workers.drain import drain

    if pipelines < 2:
        raise ValueError("the money section needs at least 2 pipelines")
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="genline-bench-money-") as tmp:
        var = Path(tmp)
        sim_log = (log_dir or var / "logs") / "money-simulator.log"
        with SimProcess(SIM_CONFIG, api_key=key, log_path=sim_log) as sim, _runtime(sim.base_url, key, var) as rt:
            policy = rt.catalog.feature_policy(FEATURE)  # the profiles the shipped catalog lets it use
            profiles = [name for name in sorted(rt.catalog.profiles) if policy.allows_profile(name)]
            requests = workload(pipelines, profiles, repeat_share=repeat_share, seed=seed)
            api = Genline(runtime=rt)
            log(
                f"bench: {pipelines} pipelines in drain mode (SQLite, simulator), "
                f"{round(repeat_share * 100)}% of copy requests repeating an earlier one"
            )
            for fields in requests:
                api.submit(fields)
            drain(rt)
            figures = _figures(rt)
            figures["provider_chat_calls"] = int(sim.stats()["chat_calls"])
    log(
        f"  cache_hit_rate {figures['cache_hit_rate']} ({figures['copy_cache_hits']} of {figures['copy_steps']} "
        f"copy steps; the provider answered {figures['provider_chat_calls']} chats), estimate_error_p95 "
        f"{figures['estimate_error_p95']} over {figures['money_pipelines_succeeded']} pipelines"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench_money", description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=100, help="pipelines to run (default 100)")
    parser.add_argument("--repeat-share", type=float, default=REPEAT_SHARE, help="share of repeated copy requests")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    from genline.config.logging import configure_logging

    configure_logging("WARNING", stream=sys.stderr)  # stdout: the JSON alone
    figures = run_money_section(
        args.pipelines,
        repeat_share=args.repeat_share,
        seed=args.seed,
        log=lambda line: print(line, file=sys.stderr, flush=True),  # stdout: the JSON alone
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
