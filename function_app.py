"""Azure Functions entry point (Python v2 programming model).

One Service Bus queue trigger; the package does the rest (writeback.functions). Settlement is explicit
(`auto_complete_messages=False`): the extension import below registers the SDK-type binding that provides
`ServiceBusReceivedMessage` and `ServiceBusMessageActions`. The connection `ServiceBusConnection` is either a
connection string or, identity-based, `ServiceBusConnection__fullyQualifiedNamespace`.
"""

import azure.functions as func
from azurefunctions.extensions.bindings import servicebus

from writeback import functions

app = func.FunctionApp()


@app.function_name("writeback")
@app.service_bus_queue_trigger(arg_name="message", queue_name="%WRITEBACK_QUEUE_NAME%",
                               connection="ServiceBusConnection", auto_complete_messages=False)
async def writeback(message: servicebus.ServiceBusReceivedMessage,
                    message_actions: servicebus.ServiceBusMessageActions) -> None:
    await functions.handle(message, message_actions)
