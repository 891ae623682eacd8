"""The simulator as a limited provider: a per-key request limit with 429, Retry-After and
x-ratelimit-* headers beyond it, and render times by model with a jitter its estimate does not know."""

from __future__ import annotations

import httpx
import pytest

from genline.provider.simulator import SimConfig, start_simulator
from tests.support.clock import ManualClock


def test_past_the_per_key_limit_the_answer_is_a_429_with_retry_after_and_the_quota_headers() -> None:
    clock = ManualClock(1_000_000.25)
    with start_simulator(SimConfig(api_key="k1", rate_limit_per_s=3), clock=clock) as sim:
        headers = {"Authorization": "Bearer k1"}
        answers = [httpx.get(f"{sim.base_url}/v1/tasks/none", headers=headers) for _ in range(4)]
        assert [a.status_code for a in answers] == [404, 404, 404, 429]
        assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        assert answers[0].headers["x-ratelimit-limit"] == "3"
        assert answers[3].headers["Retry-After"] == "1" and float(answers[3].headers["x-ratelimit-reset"]) > 0
        clock.advance(1.0)  # the next second: allowed again
        assert httpx.get(f"{sim.base_url}/v1/tasks/none", headers=headers).status_code == 404


def test_render_times_follow_the_model_and_the_estimate_does_not_know_the_jitter() -> None:
    config = SimConfig(
        render_seconds={"minimax-hailuo-2.3": 60.0, "kling-v3-omni": 90.0},
        render_spread_low=0.5,
        render_spread_high=2.0,
        render_jitter_low=0.9,
        render_jitter_high=1.15,
        seed=7,
    )
    with start_simulator(config) as sim:
        body = {"kind": "video", "count": 200, "prompt": "a product"}
        made = {
            model: httpx.post(f"{sim.base_url}/_sim/jobs", json=body | {"model": model}).json()
            for model in ("minimax-hailuo-2.3", "kling-v3-omni")
        }
        created = sim.state.jobs
    for model, nominal in (("minimax-hailuo-2.3", 60.0), ("kling-v3-omni", 90.0)):
        renders = [created[t].duration_s for t in made[model]["task_ids"]]
        assert min(renders) >= nominal * 0.5 * 0.9 and max(renders) <= nominal * 2.0 * 1.15
        assert max(renders) - min(renders) > nominal  # spread, not one time for all
        ratios = [
            created[t].duration_s / e
            for t, e in zip(made[model]["task_ids"], made[model]["estimated_times"], strict=True)
        ]
        assert min(ratios) < 1.0 < max(ratios)  # some finish before their estimate, some after
        assert all(0.85 <= r <= 1.16 for r in ratios)


def test_a_bad_render_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="render_jitter_low"):
        SimConfig(render_jitter_low=1.2, render_jitter_high=1.1)
    with pytest.raises(ValueError, match="render_seconds"):
        SimConfig(render_seconds={"m": -1.0})
