// Dataverse-to-FHIR writeback: everything the Azure Functions app needs, in a new resource group, next to
// an EXISTING Azure Health Data Services FHIR service (fhirServiceResourceId) that this template does not
// create or modify (it only grants the app FHIR Data Contributor on it).
//
// Deploy with `azd up` (azure.yaml at the repository root; parameters in main.parameters.json).
// What is deployed and why: infra/README.md. Deployment steps: docs/deploy.md.
//
// No output of this template holds a secret: no keys, connection strings or SAS are output.

targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; prefixes the resource group and seeds unique resource names.')
param environmentName string

@minLength(1)
@description('Azure region of the new resources (must offer Functions Flex Consumption).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource id of the existing FHIR service: /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.HealthcareApis/workspaces/<workspace>/fhirservices/<fhir>.')
param fhirServiceResourceId string

@description('Base URL of the FHIR service. Empty: https://<workspace>-<fhir>.fhir.azurehealthcareapis.com.')
param fhirUrl string = ''

@description('Name of the resource group to create. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

@description('Name of the Service Bus queue the Dataverse service endpoint posts to.')
param queueName string = 'dataverse-writeback'

@description('Deliveries of one message before it is dead-lettered.')
@minValue(1)
@maxValue(2000)
param maxDeliveryCount int = 10

@description('Peek-lock duration of the queue in seconds (Service Bus allows at most 300). The same value is the app setting WRITEBACK_LOCK_DURATION_SECONDS: each invocation stops working on its batch at lockDurationSeconds - FHIR_TIMEOUT_SECONDS - 30 s (docs/operations.md, Timing); batch triggers get no lock renewal. At least 90: with the default FHIR_TIMEOUT_SECONDS (30) a shorter lock leaves an invocation no time to work, and the app refuses it as a configuration fault.')
@minValue(90)
@maxValue(300)
param lockDurationSeconds int = 300

@description('Time to live of a queued message (ISO 8601); expired messages are dead-lettered.')
param messageTimeToLive string = 'P14D'

@description('Duplicate detection window of the queue (ISO 8601).')
param duplicateDetectionWindow string = 'PT10M'

@description('Most Flex Consumption instances (bounds the load on the FHIR service).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Most messages one function invocation receives and processes together (FHIR batch bundles); each is still settled on its own outcome. What a batch has not finished by its deadline inside the lock is rescheduled.')
@minValue(1)
@maxValue(1000)
param maxMessageBatchSize int = 100

@description('Python version of the function app (Flex Consumption offers 3.11 to 3.13 for new apps).')
@allowed([
  '3.11'
  '3.12'
  '3.13'
])
param pythonVersion string = '3.11'

@description('Memory of one instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Replication of the storage account.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Log Analytics retention in days.')
@minValue(30)
@maxValue(730)
param logRetentionInDays int = 90

@description('E-mail address for the dead-letter and failure alerts; empty: alerts without notification.')
param alertEmailAddress string = ''

@description('WRITEBACK_TARGET: fhir (the FHIR service) or alternate (ALTERNATE_ENDPOINT_URL).')
@allowed([
  'fhir'
  'alternate'
])
param writebackTarget string = 'fhir'

@description('WRITEBACK_IGNORE_USER_IDS: Dataverse systemuser ids of the FHIR-to-Dataverse sync (comma-separated).')
param ignoreUserIds string = ''

@description('WRITEBACK_AGENT: Device/<id> or Organization/<id>; empty for the built-in Device.')
param writebackAgent string = ''

@description('ALTERNATE_ENDPOINT_URL (writebackTarget alternate).')
param alternateEndpointUrl string = ''

@description('ALTERNATE_TOKEN_URL (writebackTarget alternate).')
param alternateTokenUrl string = ''

@description('ALTERNATE_CLIENT_ID (writebackTarget alternate).')
param alternateClientId string = ''

@description('ALTERNATE_SCOPE (optional).')
param alternateScope string = ''

@description('Key Vault secret name of the alternate endpoint client secret; the operator stores the value (docs/deploy.md).')
param alternateClientSecretName string = 'alternate-client-secret'

@description('Optional object id of the operator who stores secrets in the Key Vault (Key Vault Secrets Officer on the vault only).')
param keyVaultSecretsOfficerPrincipalId string = ''

@description('Principal type of keyVaultSecretsOfficerPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param keyVaultSecretsOfficerPrincipalType string = 'User'

@description('Extra or overriding app settings (name: value); never a secret literal, use a Key Vault reference.')
param appSettingOverrides object = {}

@description('Tags applied to every resource.')
param tags object = {}

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var allTags = union(tags, {
  'azd-env-name': environmentName
})

// /subscriptions/{0}/resourceGroups/{1}/providers/Microsoft.HealthcareApis/workspaces/{2}/fhirservices/{3}
var fhirIdParts = split(fhirServiceResourceId, '/')
var fhirSubscriptionId = fhirIdParts[2]
var fhirResourceGroupName = fhirIdParts[4]
var fhirWorkspaceName = fhirIdParts[8]
var fhirServiceName = fhirIdParts[10]
var effectiveFhirUrl = empty(fhirUrl) ? 'https://${fhirWorkspaceName}-${fhirServiceName}.fhir.azurehealthcareapis.com' : fhirUrl

var functionAppName = 'func-${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName
  location: location
  tags: allTags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: allTags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: allTags
    retentionInDays: logRetentionInDays
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: allTags
    deploymentContainerName: deploymentContainerName
    skuName: storageSkuName
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  scope: rg
  params: {
    namespaceName: 'sb-${resourceToken}'
    queueName: queueName
    location: location
    tags: allTags
    maxDeliveryCount: maxDeliveryCount
    lockDurationSeconds: lockDurationSeconds
    defaultMessageTimeToLive: messageTimeToLive
    duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: allTags
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
    secretsOfficerPrincipalId: keyVaultSecretsOfficerPrincipalId
    secretsOfficerPrincipalType: keyVaultSecretsOfficerPrincipalType
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    serviceBusQueueName: serviceBus.outputs.queueName
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

module fhirRole 'modules/fhir-role.bicep' = {
  name: 'fhir-role-${resourceToken}'
  scope: resourceGroup(fhirSubscriptionId, fhirResourceGroupName)
  params: {
    workspaceName: fhirWorkspaceName
    fhirServiceName: fhirServiceName
    principalId: identity.outputs.principalId
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: allTags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: storage.outputs.deploymentContainerName
    tableEndpoint: storage.outputs.tableEndpoint
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    queueName: serviceBus.outputs.queueName
    keyVaultUri: keyVault.outputs.uri
    fhirUrl: effectiveFhirUrl
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    maxMessageBatchSize: maxMessageBatchSize
    lockDurationSeconds: lockDurationSeconds
    pythonVersion: pythonVersion
    writebackTarget: writebackTarget
    ignoreUserIds: ignoreUserIds
    writebackAgent: writebackAgent
    alternateEndpointUrl: alternateEndpointUrl
    alternateTokenUrl: alternateTokenUrl
    alternateClientId: alternateClientId
    alternateScope: alternateScope
    alternateClientSecretName: alternateClientSecretName
    appSettingOverrides: appSettingOverrides
  }
  // The identity must hold its roles before the host first starts (storage, queue, Key Vault, FHIR).
  dependsOn: [
    roles
    fhirRole
  ]
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    namePrefix: 'writeback-${resourceToken}'
    location: location
    tags: allTags
    serviceBusNamespaceId: serviceBus.outputs.namespaceId
    queueName: serviceBus.outputs.queueName
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    alertEmailAddress: alertEmailAddress
  }
}

// Names and endpoints only; azd stores them in .azure/<env>/.env.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = subscription().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output SERVICE_BUS_NAMESPACE string = serviceBus.outputs.namespaceName
output SERVICE_BUS_QUEUE_NAME string = serviceBus.outputs.queueName
output SERVICE_BUS_SEND_RULE_NAME string = serviceBus.outputs.sendRuleName
output KEY_VAULT_NAME string = keyVault.outputs.name
output STORAGE_ACCOUNT_NAME string = storage.outputs.name
// For `python -m writeback logs` from a workstation (an endpoint URL, no key).
output OUTCOMES_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output FHIR_URL string = effectiveFhirUrl
