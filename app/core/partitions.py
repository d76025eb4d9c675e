"""Bounds on plugin_heartbeats.signed_at that let a read touch only the partitions it needs
(migration 0017, docs/partitioning.md). plugin_heartbeats is range-partitioned by signed_at,
the request's verified X-Timestamp; a query that says nothing about signed_at reads every
partition (an index probe in each, for each row of an outer loop).

SIGNED_AT_SLACK is how far the signed_at of a sample stored later can lie before the signed_at
of one stored earlier. Let q be a sample the detector has read and r one with a higher id. Ids
come from one sequence, so r's id was drawn after q's. For a heartbeat:
- signed_at >= (the API's clock when it verified the request) - tolerance, and
  signed_at <= that clock + tolerance (app/plugins/auth.py refuses anything further);
- between the verification and the INSERT that draws the id come the rate limit (one Redis
  call, at most SELFHEAL_REDIS_TIMEOUT_S, 60 s at most), the wait in the batcher (at most
  4 x SELFHEAL_DB_TIMEOUT_S) and at most 3 sends of the batch with a connect and a statement
  timeout each (app/plugins/ingest.py): at most 60 s + 10 x the DB timeout + 3 s, 1,263 s with
  the settings' largest values.
So signed_at(r) >= signed_at(q) - 2 x tolerance - 1,263 s - (the clock skew between two API
hosts). The tolerance is at most 3,600 s (its setting's bound), so 3 hours holds for any
configuration, with 39 minutes left for clock skew; a constant rather than a value computed
from one process's settings, so an API and a worker configured differently cannot make it
unsafe. A sample that breaks the bound anyway (an API process frozen for hours between the two)
is skipped by the detector, as a sample committed late already is (docs/decisions.md,
"Threshold rules read only new samples"). Rows written by hand, by the tests or the simulator
use signed_at = now().

SIGNED_AT_SLACK also bounds signed_at from above: no heartbeat is signed more than the
tolerance ahead of the clock that verified it, so `signed_at < now() + SLACK` leaves out the
empty partitions made ahead, which a scan would otherwise probe too."""

from __future__ import annotations

from datetime import timedelta

SIGNED_AT_SLACK = timedelta(hours=3)
SIGNED_AT_SLACK_SQL = f"interval '{int(SIGNED_AT_SLACK.total_seconds())} seconds'"

# How far back the detector looks for an installation's newest samples (its rules need the
# newest consecutive + baseline samples, or the crash-loop window: 11 by default, 22 minutes of
# heartbeats at the default 120 s interval). An installation whose samples are older (one back
# after a day of silence) is judged on the samples it has in that time: fewer of them, so a
# shorter baseline, never a wrong one.
SAMPLE_LOOKBACK_SQL = "interval '1 day'"


def unread_signed_at(column: str) -> str:
    """SQL true of every sample the threshold detector has not read yet (an id beyond its
    watermark), for `column`, a plugin_heartbeats.signed_at: at least the signed_at of the last
    sample it read minus SIGNED_AT_SLACK, and less than now() + SIGNED_AT_SLACK. Add it to any
    scan of new ids (`id > watermark`) so it reads the recent partitions only; PostgreSQL
    prunes the others as the statement starts (the watermark is read once, as an InitPlan).
    It reads the watermark as it stands: use it before advance_watermark moves it."""
    return (
        f"{column} >= (SELECT coalesce(w.last_signed_at, '-infinity') - {SIGNED_AT_SLACK_SQL}"
        " FROM detector_watermarks w WHERE w.name = 'samples')"
        f" AND {column} < now() + {SIGNED_AT_SLACK_SQL}"
    )
