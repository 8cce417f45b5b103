"""The service's phase, which liveness and readiness report."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"  # engine loading; readiness is false
    READY = "ready"
    RESTARTING = "restarting"  # the engine died; a new one is starting; readiness is false
    DRAINING = "draining"  # SIGTERM: in-flight requests finish, no new ones should come
    STOPPED = "stopped"
    FAILED = "failed"  # start-up failed, or the engine died and could not be restarted


class ServiceLifecycle:
    """Where the service is between start and stop; changed by the lifespan and the supervisor."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.failure: str | None = None
        self._on_failure: list[Callable[[str], None]] = []
        self._on_ready: list[Callable[[], None]] = []

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call `listener` once the service fails (the CLI exits, so orchestrators restart it)."""
        self._on_failure.append(listener)

    def on_ready(self, listener: Callable[[], None]) -> None:
        """Call `listener` once start-up is done, just before readiness turns true."""
        self._on_ready.append(listener)

    def ready(self) -> None:
        """STARTING -> READY, unless a stop or a failure came first."""
        if self.phase is not Phase.STARTING:
            return
        for listener in self._on_ready:
            listener()
        self.phase = Phase.READY

    def fail(self, reason: str) -> None:
        if self.phase is Phase.FAILED:
            return
        self.phase = Phase.FAILED
        self.failure = reason
        for listener in self._on_failure:
            listener(reason)

    def drain(self) -> None:
        if self.phase in (Phase.STARTING, Phase.READY, Phase.RESTARTING):
            self.phase = Phase.DRAINING

    def engine_died(self) -> bool:
        """READY -> RESTARTING; False (no change) when stopping, failed or already restarting."""
        if self.phase is not Phase.READY:
            return False
        self.phase = Phase.RESTARTING
        return True

    def engine_restarted(self) -> None:
        """RESTARTING -> READY, unless a stop began meanwhile."""
        if self.phase is Phase.RESTARTING:
            self.phase = Phase.READY
