"""The service's phase, which liveness and readiness report."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"  # engine loading; readiness is false
    READY = "ready"
    DRAINING = "draining"  # SIGTERM: in-flight requests finish, no new ones should come
    STOPPED = "stopped"
    FAILED = "failed"  # start-up failed or the engine died


class ServiceLifecycle:
    """Where the service is between start and stop; changed only by the app's lifespan."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.failure: str | None = None

    def fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.failure = reason

    def drain(self) -> None:
        if self.phase in (Phase.STARTING, Phase.READY):
            self.phase = Phase.DRAINING
