"""The services a running app holds once the engine is up."""

from __future__ import annotations

from dataclasses import dataclass

from server.admin.adapter_service import AdapterService
from server.admin.store_sync import StoreSync
from server.engine.supervisor import EngineSupervisor
from server.inference.chat_serving import ChatService
from server.inference.completion_serving import CompletionService


@dataclass(frozen=True)
class Services:
    engine: EngineSupervisor  # forwards to the current engine, which it replaces if it dies
    adapters: AdapterService
    chat: ChatService
    completions: CompletionService
    started_at: int  # unix time the base model became ready
    store: StoreSync | None = None  # the shared adapter store, when configured
