"""The Service Bus adapter that puts retries back on the queue: scheduled copies (see `writeback.retry`).

One async `ServiceBusClient` and one sender per process, opened on first use. The connection is the trigger's:
`ServiceBusConnection` (a connection string: the local emulator) or, in Azure,
`ServiceBusConnection__fullyQualifiedNamespace` with the app's managed identity (`ServiceBusConnection__clientId`
for a user-assigned one), which holds Azure Service Bus Data Sender on the queue.

The broker cannot run here: the tests use a simulated queue with the same `Scheduler` protocol
(tests/reliability/broker.py), and `tests/function/test_admin.py` holds the opt-in test against a real
namespace or emulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import field
from datetime import datetime
from typing import Any, Protocol

from writeback.errors import ConfigError
from writeback.immutable import immutable
from writeback.settings import Settings


@immutable
class Copy:
    """A message to put on the queue at `at` (UTC)."""

    body: bytes
    message_id: str
    at: datetime
    content_type: str | None = None
    correlation_id: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)


class Scheduler(Protocol):
    async def schedule(self, copies: Sequence[Copy]) -> None:
        """Put every copy on the queue (scheduled), or raise: the caller then abandons the originals."""
        ...

    async def aclose(self) -> None: ...


def servicebus_message(copy: Copy) -> Any:
    """The `ServiceBusMessage` of a copy (its scheduled enqueue time set, so sending it schedules it)."""
    from azure.servicebus import ServiceBusMessage  # noqa: PLC0415 - keeps the SDK off the core's import path

    props: dict[str | bytes, Any] = {str(k): v for k, v in copy.properties.items()}
    return ServiceBusMessage(copy.body, message_id=copy.message_id, content_type=copy.content_type,
                             correlation_id=copy.correlation_id, application_properties=props,
                             scheduled_enqueue_time_utc=copy.at)


class ServiceBusScheduler:
    """`Scheduler` over azure-servicebus (async): copies go out in message batches, each at its own time."""

    def __init__(self, settings: Settings) -> None:
        if not (settings.servicebus_connection_string or settings.servicebus_namespace):
            raise ConfigError("ServiceBusConnection__fullyQualifiedNamespace",
                              "is not set (nor ServiceBusConnection): retries cannot be scheduled")
        self._settings = settings
        self._client: Any = None
        self._sender: Any = None
        self._credential: Any = None
        self._lock = asyncio.Lock()

    async def _open(self) -> Any:
        async with self._lock:
            if self._sender is None:
                from azure.servicebus.aio import ServiceBusClient  # noqa: PLC0415

                settings = self._settings
                if settings.servicebus_connection_string:
                    self._client = ServiceBusClient.from_connection_string(settings.servicebus_connection_string)
                else:
                    from azure.identity.aio import ManagedIdentityCredential  # noqa: PLC0415

                    self._credential = ManagedIdentityCredential(client_id=settings.servicebus_client_id or None)
                    self._client = ServiceBusClient(settings.servicebus_namespace, credential=self._credential)
                self._sender = self._client.get_queue_sender(settings.queue_name)
            return self._sender

    async def schedule(self, copies: Sequence[Copy]) -> None:
        if not copies:
            return
        sender = await self._open()
        batch = await sender.create_message_batch()
        for copy in copies:
            message = servicebus_message(copy)
            try:
                batch.add_message(message)
            except ValueError:  # the batch is full: send it and start the next
                await sender.send_messages(batch)
                batch = await sender.create_message_batch()
                batch.add_message(message)
        await sender.send_messages(batch)

    async def aclose(self) -> None:
        for closable in (self._sender, self._client, self._credential):
            if closable is not None:
                await closable.close()
        self._sender = self._client = self._credential = None
