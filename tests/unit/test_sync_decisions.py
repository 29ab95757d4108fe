"""The pure parts of sync: the decision table, the head record, the since-map, the etcd
options, and the value formats of the store (no etcd needed for any of these)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.adapters.store import HeadRecord, decode_since, encode_since, parse_endpoint
from reconciler.cli.etcd_cmds import default_source
from reconciler.cli.options import etcd_settings, parse_endpoints
from reconciler.core.settings import EtcdSettings
from reconciler.service.sync import Ancestry, Reason, Status, build_head, carry_since, decide

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD, NEW = "a" * 40, "b" * 40
HEAD = HeadRecord(commit=OLD, graph_digest="sha256:old", synced_at=T0, source="ci", seq=4)


@pytest.mark.parametrize(("ancestry", "force", "status", "reason"), [
    (Ancestry.DESCENDANT, False, Status.SYNCED, Reason.FAST_FORWARD),
    (Ancestry.DESCENDANT, True, Status.SYNCED, Reason.FAST_FORWARD),  # --force changes nothing
    (Ancestry.OLDER, False, Status.REFUSED, Reason.NOT_FAST_FORWARD),
    (Ancestry.OLDER, True, Status.SYNCED, Reason.FORCED),
    (Ancestry.DIVERGED, False, Status.REFUSED, Reason.NOT_FAST_FORWARD),
    (Ancestry.DIVERGED, True, Status.SYNCED, Reason.FORCED),
    (Ancestry.UNKNOWN, False, Status.REFUSED, Reason.UNKNOWN_HEAD),
    (Ancestry.UNKNOWN, True, Status.SYNCED, Reason.FORCED),
])
def test_decision_table_for_another_commit(ancestry: Ancestry, force: bool, status: Status,
                                           reason: Reason) -> None:
    decision = decide(HEAD, NEW, "sha256:new", ancestry, force=force)
    assert (decision.status, decision.reason) == (status, reason)
    assert decision.writes == (status is Status.SYNCED)


def test_refusal_messages_say_what_to_do() -> None:
    older = decide(HEAD, NEW, "d", Ancestry.OLDER, force=False).message
    assert "older than the synced head aaaaaaaaaaaa" in older
    assert "by ci" in older
    assert "--force" in older
    unknown = decide(HEAD, NEW, "d", Ancestry.UNKNOWN, force=False).message
    assert "fetch-depth: 0" in unknown
    assert "rollback" in decide(HEAD, NEW, "d", Ancestry.OLDER, force=True).message


def test_first_sync_and_same_commit() -> None:
    assert decide(None, NEW, "d", None, force=False).reason is Reason.FIRST
    same = decide(HEAD, OLD, "sha256:old", Ancestry.SAME, force=False)
    assert (same.status, same.writes) == (Status.NOOP, False)
    assert decide(HEAD, OLD, "sha256:old", Ancestry.SAME, force=True).status is Status.NOOP
    changed = decide(HEAD, OLD, "sha256:other", Ancestry.SAME, force=False)
    assert (changed.status, changed.reason) == (Status.REFUSED, Reason.DIGEST_MISMATCH)
    assert decide(HEAD, OLD, "sha256:other", Ancestry.SAME, force=True).reason is Reason.FORCED


commits = st.sampled_from([OLD, NEW, "c" * 40])
digests = st.sampled_from(["sha256:old", "sha256:x"])
relations = st.sampled_from(list(Ancestry))


@given(commit=commits, digest=digests, ancestry=relations, force=st.booleans())
def test_without_force_only_a_fast_forward_or_first_sync_writes(
        commit: str, digest: str, ancestry: Ancestry, force: bool) -> None:
    decision = decide(HEAD, commit, digest, ancestry, force=force)
    if decision.writes and not force:
        assert decision.reason is Reason.FAST_FORWARD
    if commit == OLD and digest == HEAD.graph_digest:
        assert decision.status is Status.NOOP  # the same commit never writes, forced or not
    if decision.reason is Reason.FORCED:
        assert force


def test_build_head_chains_to_the_previous_head() -> None:
    now = datetime(2026, 2, 1, 10, tzinfo=timezone(timedelta(hours=2)))
    first = build_head(OLD, "d1", now=now, source="s", previous=None, forced=False)
    assert (first.previous, first.seq, first.synced_at) == (None, 1, now.astimezone(UTC))
    assert first.synced_at.tzinfo == UTC
    rollback = build_head(NEW, "d2", now=now, source="s", previous=HEAD, forced=True)
    assert (rollback.previous, rollback.seq, rollback.forced) == (OLD, 5, True)


def test_carry_since_keeps_first_appearance() -> None:
    t1 = T0 + timedelta(days=1)
    previous = {"a": T0, "gone": T0}
    assert carry_since(previous, ["b", "a"], t1) == {"a": T0, "b": t1}
    assert carry_since({}, ["a"], t1) == {"a": t1}


def test_head_record_round_trip_and_mapping_access() -> None:
    record = HeadRecord(commit=NEW, graph_digest="d", synced_at=T0, source="s", previous=OLD,
                        forced=True, seq=9)
    data = record.to_dict()
    assert data == {"commit": NEW, "graph_digest": "d", "synced_at": "2026-01-01T00:00:00+00:00",
                    "source": "s", "previous": OLD, "forced": True, "seq": 9}
    assert HeadRecord.from_dict({**data, "unknown_future_key": 1}) == record
    assert record["commit"] == NEW
    with pytest.raises(KeyError):
        record["nope"]


def test_since_map_encoding_round_trip() -> None:
    since = {"b": T0, "a": T0 + timedelta(seconds=1.5)}
    blob = encode_since(since)
    assert blob[:2] == b"\x1f\x8b"  # gzip
    assert decode_since(blob) == since
    assert encode_since(dict(reversed(list(since.items())))) == blob  # deterministic
    with pytest.raises(ValueError, match="naive"):
        encode_since({"a": datetime(2026, 1, 1)})


def test_endpoints() -> None:
    assert parse_endpoint("10.0.0.1:2379") == ("10.0.0.1", 2379, False)
    assert parse_endpoint("https://etcd.example:2379/") == ("etcd.example", 2379, True)
    assert parse_endpoint("[::1]:2379") == ("::1", 2379, False)
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoint("etcd")
    assert parse_endpoints(" a:1, b:2 ,") == ("a:1", "b:2")
    for bad in ("", "a", "a:0", "a:x"):
        with pytest.raises(click.BadParameter):
            parse_endpoints(bad)


def _settings(**kw: object) -> EtcdSettings:
    values: dict[str, object] = {
        "endpoints": "127.0.0.1:2379", "prefix": "reconciler", "namespace": "default",
        "user": None, "password_file": None, "ca": None, "cert": None, "key": None,
        "timeout": 5.0, "environ": {}}
    values.update(kw)
    return etcd_settings(**values)  # type: ignore[arg-type]


def test_etcd_settings_from_options(tmp_path: Path) -> None:
    s = _settings(endpoints="a:1,b:2", namespace="team-a")
    assert (s.endpoints, s.root, s.user, s.password) == (("a:1", "b:2"), "/reconciler/team-a/",
                                                         None, None)
    s = _settings(user="u", environ={"RECONCILER_ETCD_PASSWORD": "pw"})
    assert (s.user, s.password) == ("u", "pw")
    assert "pw" not in repr(s)
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    s = _settings(user="u", password_file=str(secret), environ={"RECONCILER_ETCD_PASSWORD": "x"})
    assert s.password == "from-file"  # the file, if given, wins


@pytest.mark.parametrize(("kw", "message"), [
    ({"user": "u"}, "needs a password"),
    ({"environ": {"RECONCILER_ETCD_PASSWORD": "pw"}}, "no user"),
    ({"cert": "c.pem"}, "go together"),
    ({"namespace": "/"}, "cannot be part of an etcd key"),
    ({"prefix": "has space"}, "cannot be part of an etcd key"),
])
def test_etcd_settings_refusals(kw: dict[str, object], message: str) -> None:
    with pytest.raises(click.UsageError, match=message):
        _settings(**kw)


def test_default_source() -> None:
    github = {"GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "o/r", "GITHUB_SHA": NEW,
              "GITHUB_RUN_ID": "42"}
    assert default_source(github) == f"github:o/r@{NEW[:12]} run 42"
    assert default_source({"CI": "1"}) == "ci"
    assert default_source({}).startswith("cli:")


def test_build_head_never_records_a_credential_in_the_source() -> None:
    head = build_head(NEW, "d", now=T0, source="pull:https://bot:hunter2@git.example.com/g.git@main",
                      previous=None, forced=False)
    assert head.source == "pull:https://git.example.com/g.git@main"

