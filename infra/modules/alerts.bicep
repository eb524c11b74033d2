// Alerts that can fire: on what the function decided, and on what Service Bus holds.
//
// The function settles every message itself and its handler catches every error, so the host never sees a
// failed execution: an alert on failed requests/executions could never fire. The function's own per-message
// outcome record (logger `writeback.function`, OpenTelemetry, its `extra` fields as customDimensions of a
// `traces` row; docs/operations.md) is what the log alerts below query:
//   - dead-lettered: a message was dead-lettered by the code (permanent fault, or `retries-exhausted` when
//     the retry window ran out);
//   - config-error: a setting, map or credential is wrong; nothing is written until it is fixed.
// The metric alert covers what the code never sees: the broker dead-letters a message itself when its
// deliveries run out (MaxDeliveryCountExceeded) or it expires, and it stays firing while the dead-letter queue
// is not empty.
// Each fires on the first occurrence (threshold: > 0). An action group (e-mail) is created only when an
// address is given; without one the alerts still show in Azure Monitor and can be routed by an existing
// alert processing rule.

@description('Prefix of the alert names.')
param namePrefix string

@description('Azure region of the log alert rules (that of the Application Insights component).')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Resource id of the Service Bus namespace.')
param serviceBusNamespaceId string

@description('Name of the writeback queue.')
param queueName string

@description('Resource id of the Application Insights component of the function app.')
param applicationInsightsId string

@description('E-mail address notified by the alerts; empty: no action group.')
param alertEmailAddress string = ''

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmailAddress)) {
  name: '${namePrefix}-ag'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'writeback'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmailAddress
        useCommonAlertSchema: true
      }
    ]
  }
}

var metricActions = empty(alertEmailAddress) ? [] : [
  {
    actionGroupId: actionGroup.id
  }
]

var logActions = {
  actionGroups: empty(alertEmailAddress) ? [] : [
    actionGroup.id
  ]
}

resource deadLetterQueueAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'The dead-letter queue of ${queueName} is not empty: a change from Dataverse was not written back. Find the reason (python -m writeback logs --status failed, or the message\'s DeadLetterReason), fix it, then resubmit (docs/operations.md).'
    severity: 1
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeadLetteredMessages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: metricActions
  }
}

// One alert per reason code, so a new kind of fault raises a new alert instead of hiding in an open one.
resource deadLetteredOutcomeAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-outcome-dead-lettered'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: messages dead-lettered by the function'
    description: 'The function dead-lettered a message (a permanent fault, or retries-exhausted). The alert is split by reason code; the README says what to do for each. Details: python -m writeback logs --status failed.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: '''
traces
| where tostring(customDimensions["outcome"]) == "dead-lettered"
| extend reason = tostring(customDimensions["reason"])
'''
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'reason'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: logActions
  }
}

resource configErrorOutcomeAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-outcome-config-error'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: configuration fault'
    description: 'A setting, entity map or credential is wrong (the log line names it): nothing is written until it is fixed, and messages wait in the retry schedule. Run python -m writeback check-config with the app settings.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: '''
traces
| where tostring(customDimensions["outcome"]) == "config-error"
| extend reason = tostring(customDimensions["reason"])
'''
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'reason'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: logActions
  }
}
