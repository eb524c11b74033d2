// Service Bus namespace and the writeback queue the Dataverse service endpoint posts to.
//
// Dataverse service endpoints authenticate to Service Bus with a SAS key only (no Entra ID option), so
// local (SAS) authentication stays enabled on the namespace. The only SAS rule deployed is a send-only
// rule on the queue itself: it cannot listen, manage, or reach any other entity. The function app does
// not use SAS at all: it connects with its managed identity (Azure Service Bus Data Receiver on the queue for
// the trigger, Data Sender to schedule retries of transient failures on the same queue and to resubmit
// dead-lettered messages; see roles.bicep). No key is ever output; the operator reads the rule's key when
// registering the service endpoint (docs/deploy.md).

@description('Name of the Service Bus namespace.')
param namespaceName string

@description('Name of the queue (the app setting WRITEBACK_QUEUE_NAME).')
param queueName string

@description('Azure region.')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Name of the send-only SAS authorization rule the Dataverse service endpoint uses.')
param sendRuleName string = 'dataverse-send'

@description('Deliveries of one message before Service Bus moves it to the dead-letter queue.')
@minValue(1)
@maxValue(2000)
param maxDeliveryCount int = 10

// The Functions host does NOT renew the locks of a batch trigger (cardinality many): maxAutoLockRenewalDuration
// applies to single-message functions only. An invocation therefore has to finish, settle and reschedule its
// batch within this one lock; the app's deadline is derived from the same parameter
// (WRITEBACK_LOCK_DURATION_SECONDS).
@description('Peek-lock duration in seconds (Service Bus allows at most 300). Batch triggers get no lock renewal: the whole invocation, settlements included, must fit in it.')
@minValue(90)
@maxValue(300)
param lockDurationSeconds int = 300

@description('Time to live of a message (ISO 8601). Expired messages are dead-lettered, never dropped.')
param defaultMessageTimeToLive string = 'P14D'

@description('Duplicate detection window (ISO 8601, 20 seconds to 7 days): a message whose MessageId was seen within the window is dropped.')
param duplicateDetectionHistoryTimeWindow string = 'PT10M'

@description('Resource id of the Log Analytics workspace receiving the namespace logs.')
param logAnalyticsWorkspaceId string

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  // Standard: duplicate detection is not available on Basic; Premium is only needed for private endpoints.
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
    // Dataverse posts from the Microsoft cloud over the internet with the send-only SAS key.
    publicNetworkAccess: 'Enabled'
    // SAS must stay enabled: a Dataverse service endpoint cannot authenticate with Entra ID.
    disableLocalAuth: false
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: namespace
  name: queueName
  properties: {
    maxDeliveryCount: maxDeliveryCount
    lockDuration: 'PT${lockDurationSeconds}S'
    defaultMessageTimeToLive: defaultMessageTimeToLive
    deadLetteringOnMessageExpiration: true
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: duplicateDetectionHistoryTimeWindow
    requiresSession: false
    enablePartitioning: false
    enableBatchedOperations: true
    maxSizeInMegabytes: 5120
  }
}

// Send-only SAS rule for the Dataverse service endpoint, scoped to this queue.
resource sendRule 'Microsoft.ServiceBus/namespaces/queues/authorizationRules@2024-01-01' = {
  parent: queue
  name: sendRuleName
  properties: {
    rights: [
      'Send'
    ]
  }
}

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: namespace
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output namespaceName string = namespace.name
output namespaceId string = namespace.id
output queueName string = queue.name
output queueId string = queue.id
// Host name only, e.g. contoso.servicebus.windows.net (serviceBusEndpoint is https://<host>:443/).
output fullyQualifiedNamespace string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
// The rule's name, never its keys.
output sendRuleName string = sendRule.name
