"""benchmarks/stream_efficiency.py reads the index's freshness while training from the daemon's log."""

from benchmarks.stream_efficiency import index_freshness


def event(name: str, second: float, **fields) -> dict:
    return {"event": name, "timestamp": f"2026-12-02T10:00:{second:06.3f}Z", **fields}


def test_index_freshness_at_the_last_step():
    events = [
        event("checkpoint", 10.0, checkpoint="exp-000001", kind="experience"),
        event("checkpoint", 12.0, checkpoint="exp-000001-step-000000040", kind="interval"),
        event("index_refreshed", 15.5, encoder_version=1),
        event("checkpoint", 30.0, checkpoint="exp-000002", kind="experience"),
        event("idle_exit", 45.0, idle_seconds=3.0),  # the last step at 42 s
        event("index_refreshed", 46.0, encoder_version=2),  # after the last step: not live while training
    ]
    assert index_freshness(events) == {
        "refresh_seconds_after_checkpoint": {"1": 5.5, "2": 16.0},
        "versions_behind_at_last_step": 1,
        "stale_seconds_at_last_step": 12.0,
    }


def test_no_idle_exit_no_freshness():
    assert index_freshness([event("checkpoint", 1.0, checkpoint="exp-000001", kind="experience")]) == {}
