"""Service Bus messages exactly as the Functions host hands them to the extension.

The host sends the SDK-type binding's `model_binding_data` content: the 16-byte lock token (little-endian UUID)
followed by the received AMQP message (header, delivery annotations holding `x-opt-lock-token`, message
annotations, properties, application properties, data body). `received_message` builds those bytes with uamqp
(the extension's own decoder dependency) and decodes them with the extension's `ServiceBusConverter`, so the
function under test gets the very `ServiceBusReceivedMessage` type and values it gets in Azure.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import uamqp  # type: ignore[import-untyped]
from azurefunctions.extensions.base import Datum
from azurefunctions.extensions.bindings.servicebus import ServiceBusConverter, ServiceBusReceivedMessage
from uamqp.message import MessageProperties  # type: ignore[import-untyped]

LOCK_TOKEN_KEY = b"x-opt-lock-token"


class ModelBindingData:
    """The shape of the worker's `model_binding_data` protobuf message (the fields the converter reads)."""

    def __init__(self, content: bytes) -> None:
        self.version = "1.0"
        self.source = "AzureServiceBusReceivedMessage"
        self.content_type = "application/octet-stream"
        self.content = content


def _header(delivery_count: int) -> bytes:
    # AMQP header section: described list (0x70) of durable, priority, ttl, first-acquirer (all null) and
    # delivery-count (smalluint).
    return b"\x00Sp\xc0\x07\x05@@@@R" + bytes([delivery_count & 0xFF])


def _delivery_annotations(lock_token: uuid.UUID) -> bytes:
    # described map (0x71) with one entry: symbol x-opt-lock-token → uuid (0x98, network byte order)
    entry = b"\xa3" + bytes([len(LOCK_TOKEN_KEY)]) + LOCK_TOKEN_KEY + b"\x98" + lock_token.bytes
    return b"\x00Sq\xc1" + bytes([len(entry) + 1, 2]) + entry


def amqp_content(body: bytes, *, message_id: str, content_type: str | None, correlation_id: str | None,
                 application_properties: dict[str, Any] | None, delivery_count: int, lock_token: uuid.UUID,
                 sequence_number: int = 1) -> bytes:
    now = datetime.now(UTC)
    props = MessageProperties(message_id=message_id, content_type=content_type, correlation_id=correlation_id)
    message = uamqp.Message(body=body, properties=props,
                            application_properties={k.encode(): v for k, v in (application_properties or {}).items()})
    message.annotations = {b"x-opt-enqueued-time": now, b"x-opt-sequence-number": sequence_number,
                           b"x-opt-locked-until": now + timedelta(minutes=1)}
    encoded: bytes = message.encode_message()
    assert not encoded.startswith(b"\x00Sp"), "uamqp added a header section"
    return lock_token.bytes_le + _header(delivery_count) + _delivery_annotations(lock_token) + encoded


def host_content(body: bytes | str, *, message_id: str | None = None,
                 content_type: str | None = "application/json", correlation_id: str | None = None,
                 application_properties: dict[str, Any] | None = None, delivery_count: int = 1,
                 lock_token: uuid.UUID | None = None) -> bytes:
    """The `model_binding_data` content the host sends for one message."""
    raw = body.encode() if isinstance(body, str) else body
    return amqp_content(raw, message_id=message_id or uuid.uuid4().hex, content_type=content_type,
                        correlation_id=correlation_id, application_properties=application_properties,
                        delivery_count=delivery_count, lock_token=lock_token or uuid.uuid4())


def received_message(body: bytes | str, **kw: Any) -> Any:
    """A `ServiceBusReceivedMessage` decoded by the extension from host-format bytes (`host_content`'s keywords)."""
    datum = Datum(ModelBindingData(host_content(body, **kw)), "model_binding_data")
    message = ServiceBusConverter.decode(datum, trigger_metadata=None, pytype=ServiceBusReceivedMessage)
    assert message is not None
    return message


class CollectionModelBindingData:
    """The shape of the worker's `collection_model_binding_data` (a batch trigger, cardinality many)."""

    def __init__(self, contents: Sequence[bytes]) -> None:
        self.model_binding_data = [ModelBindingData(content) for content in contents]


def received_batch(contents: Sequence[bytes]) -> list[Any]:
    """The list of `ServiceBusReceivedMessage` the extension decodes for one invocation of a batch trigger."""
    datum = Datum(CollectionModelBindingData(contents), "collection_model_binding_data")
    messages = ServiceBusConverter.decode(datum, trigger_metadata=None, pytype=list[ServiceBusReceivedMessage])
    assert isinstance(messages, list) and len(messages) == len(contents)
    return messages
