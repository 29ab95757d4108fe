"""The error hierarchy and the one mapping from an error to log level, backoff and
readiness (reconciler.core.errors.disposition), and the loop settings' own checks."""

from __future__ import annotations

import logging
import random
from datetime import timedelta

import pytest

from reconciler.adapters.airflow import (
    AirflowAuthError,
    AirflowConflict,
    AirflowNotFound,
    AirflowRejected,
    AirflowUnavailable,
    redact_url,
)
from reconciler.adapters.store import (
    NotLeader,
    StoreAccessDenied,
    StoreCorrupt,
    StoreRequestTooLarge,
    StoreUnavailable,
)
from reconciler.core.errors import (
    HUMAN_BACKOFF,
    MAX_BACKOFF,
    BadStoredData,
    LostLeadership,
    NeedsHuman,
    RetryLater,
    backoff,
    disposition,
)
from reconciler.core.settings import LoopSettings


@pytest.mark.parametrize(("error", "kind", "dependency", "unready"), [
    (StoreUnavailable("etcd down"), "retry", "etcd", True),
    (StoreAccessDenied("bad password"), "human", "etcd", True),
    (StoreRequestTooLarge("too big"), "human", "etcd", True),
    (NotLeader("someone else"), "lost-leadership", "etcd", False),
    (StoreCorrupt("/r/d/ledger/x/y", "not JSON"), "bad-data", "etcd", False),
    (AirflowUnavailable("502"), "retry", "airflow", True),
    (AirflowAuthError("401"), "human", "airflow", True),
    (AirflowNotFound("no DAG"), "human", "airflow", True),
    (AirflowConflict("other run"), "human", "airflow", True),
    (AirflowRejected("an HTML page"), "human", "airflow", True),
    (KeyError("a bug"), "bug", "internal", False),
])
def test_each_error_has_one_disposition(error: Exception, kind: str, dependency: str,
                                        unready: bool) -> None:
    how = disposition(error, 1, interval=5)
    assert (how.kind, how.dependency, how.unready) == (kind, dependency, unready)


def test_wrong_credentials_are_not_transient() -> None:
    assert isinstance(StoreAccessDenied("x"), NeedsHuman)
    assert not isinstance(StoreAccessDenied("x"), RetryLater)
    assert disposition(StoreAccessDenied("x"), 1, interval=5).delay >= HUMAN_BACKOFF
    assert disposition(AirflowAuthError("x"), 1, interval=5).level == logging.ERROR


def test_corrupt_data_and_lost_leadership_have_their_bases() -> None:
    corrupt = StoreCorrupt("/r/d/desired/head", "KeyError: 'synced_at'")
    assert isinstance(corrupt, BadStoredData)
    assert corrupt.key == "/r/d/desired/head"
    assert "desired/head" in str(corrupt)
    assert isinstance(NotLeader("x"), LostLeadership)
    assert disposition(NotLeader("x"), 3, interval=5).delay == 0


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff(n, 5, rand=rng) for n in range(1, 12)]
    assert delays[0] <= 5
    assert max(delays) <= MAX_BACKOFF
    assert delays[-1] >= MAX_BACKOFF / 2
    spread = {round(backoff(4, 5, rand=random.Random(seed)), 3) for seed in range(20)}
    assert len(spread) > 10  # two replicas that failed together do not retry together


@pytest.mark.parametrize(("fields", "says"), [
    ({"interval": 0}, "--interval must be above 0"),
    ({"interval": -1}, "--interval must be above 0"),
    ({"lease_ttl": 0}, "--lease-ttl must be at least 2"),
    ({"relist_interval": 0}, "--relist-interval"),
    ({"window": timedelta(0)}, "--window"),
    ({"concurrency": 0}, "--concurrency"),
    ({"call_deadline": 10.0, "lease_ttl": 10}, "--airflow-deadline"),
])
def test_loop_settings_that_would_spin_are_refused(fields: dict[str, object],
                                                   says: str) -> None:
    with pytest.raises(ValueError, match=says):
        LoopSettings(**fields)  # type: ignore[arg-type]


def test_an_action_deadline_is_shorter_than_the_lease() -> None:
    settings = LoopSettings(lease_ttl=9)
    assert settings.action_deadline == 4.5
    assert settings.liveness_timeout >= 2 * MAX_BACKOFF


def test_urls_never_show_credentials() -> None:
    assert redact_url("https://bob:s3cret@airflow.example:8443/x") == \
        "https://***@airflow.example:8443/x"
    assert redact_url("http://localhost:8080") == "http://localhost:8080"
