"""Azure Functions entry point (Python v2 programming model).

One Service Bus queue trigger with `cardinality=many`: each invocation gets up to host.json's
`extensions.serviceBus.maxMessageBatchSize` messages as a list, and the package does the rest
(writeback.functions.handle_batch), settling every message on its own outcome. Settlement is explicit
(`auto_complete_messages=False`): the extension import below registers the SDK-type binding that provides
`ServiceBusReceivedMessage` (a list of them for a batch) and `ServiceBusMessageActions`. The connection
`ServiceBusConnection` is either a connection string or, identity-based,
`ServiceBusConnection__fullyQualifiedNamespace`.
"""

import typing

import azure.functions as func
from azurefunctions.extensions.bindings import servicebus

from writeback import functions, telemetry

telemetry.configure()
app = func.FunctionApp()


# typing.List, not list[...]: the Python worker's load check accepts classes and typing generics only, and rejects
# a builtin generic with "invalid non-type annotation" (tests/worker drives the real worker to keep it so).
@app.function_name("writeback")
@app.service_bus_queue_trigger(arg_name="messages", queue_name="%WRITEBACK_QUEUE_NAME%",
                               connection="ServiceBusConnection", cardinality=func.Cardinality.MANY,
                               auto_complete_messages=False)
async def writeback(messages: typing.List[servicebus.ServiceBusReceivedMessage],  # noqa: UP006
                    message_actions: servicebus.ServiceBusMessageActions) -> None:
    await functions.handle_batch(messages, message_actions)
