"""Which Airflow REST API to speak: the setting (`AirflowSettings.api`, from
RECONCILER_AIRFLOW_API: `auto`, `v1` or `v2`) checked against what the server says, once at
start, and the client for it.

- `auto` asks `GET /api/v2/version`, then `GET /api/v1/version` (both without auth). The
  one that answers a version wins: Airflow 3 has only v2; Airflow 2 only v1 (its
  `/api/v2/version` is a 404 with an HTML body). A version endpoint behind auth (401/403:
  a proxy in front of it) still tells that this generation exists.
- `v1` or `v2` is checked the same way; a wrong choice (Airflow 3 told v1, Airflow 2 told
  v2, or no Airflow at that URL) is `AirflowApiMismatch` naming what to set: the CLI turns
  it into one line and exit 2.
- Unreachable: `AirflowUnavailable`, as any call (the loop waits, a one-shot exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.adapters.airflow import (
    DEFAULT_DEADLINE,
    AirflowClient,
    AirflowError,
)
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.core.errors import NeedsHuman
from reconciler.core.settings import AirflowSettings

CHOICES = ("auto", "v1", "v2")
_VERSION = {"v2": "/api/v2/version", "v1": "/api/v1/version"}
_MAJOR = {"v2": "Airflow 3", "v1": "Airflow 2"}


class AirflowApiMismatch(AirflowError, NeedsHuman):
    """The chosen API is not what the server speaks, or the URL has no Airflow API."""


@dataclass(frozen=True)
class Detected:
    generation: str
    """"v1" (Airflow 2) or "v2" (Airflow 3)."""
    version: str | None
    """Airflow's version as the server said it (None: its version endpoint needs auth)."""
    chosen: str
    """The setting: "auto", "v1" or "v2"."""


def _probe(transport: AirflowClient, generation: str) -> tuple[int, str | None]:
    """(status, version) of one version endpoint; the version when it answered one."""
    response = transport._send("GET", _VERSION[generation], auth=False)
    version = None
    if response.status_code == 200:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("version"), str):
            version = body["version"]
    return response.status_code, version


def _exists(answer: tuple[int, str | None]) -> bool:
    status, version = answer
    return version is not None or status in (401, 403)


def detect(settings: AirflowSettings, *, deadline: float = DEFAULT_DEADLINE) -> Detected:
    """The API generation to use, from the setting and the server (one or two requests)."""
    chosen = settings.api
    if chosen not in CHOICES:
        raise AirflowApiMismatch(f"RECONCILER_AIRFLOW_API must be one of "
                                 f"{', '.join(CHOICES)}, got {chosen!r}")
    transport = AirflowClient(settings, deadline=deadline)
    first = "v2" if chosen in ("auto", "v2") else "v1"
    answers = {first: _probe(transport, first)}
    if chosen == "auto" and answers[first][1] is not None:
        return Detected(first, answers[first][1], chosen)
    if chosen != "auto" and _exists(answers[first]):
        return Detected(first, answers[first][1], chosen)
    other = "v1" if first == "v2" else "v2"
    answers[other] = _probe(transport, other)
    if chosen == "auto":
        for generation in ("v2", "v1"):
            if answers[generation][1] is not None:
                return Detected(generation, answers[generation][1], chosen)
        for generation in ("v2", "v1"):
            if _exists(answers[generation]):
                return Detected(generation, None, chosen)
    said = "; ".join(f"GET {_VERSION[g]} answered {answers[g][0]}" for g in ("v2", "v1"))
    if _exists(answers[other]):
        version = answers[other][1]
        what = f"{_MAJOR[other]}" + (f" ({version})" if version else "")
        raise AirflowApiMismatch(
            f"RECONCILER_AIRFLOW_API={chosen}, but {transport.base} is {what}, which speaks "
            f"API {other} only ({said}): set RECONCILER_AIRFLOW_API={other} or auto")
    raise AirflowApiMismatch(f"no Airflow REST API at {transport.base} ({said}): check "
                             "RECONCILER_AIRFLOW_URL")


def client_for(detected: Detected, settings: AirflowSettings, *,
               deadline: float = DEFAULT_DEADLINE) -> AirflowClient:
    """The client of that generation (both are `AirflowClient`s: the same interface)."""
    if detected.generation == "v1":
        return AirflowV1Client(settings, deadline=deadline, airflow_version=detected.version)
    return AirflowClient(settings, deadline=deadline)
