// Flex Consumption plan and the Python function app (code package: the repository root, deployed by azd).
//
// App settings: `appSettings` below sets every setting declared in writeback/settings.py (SETTINGS) except
// AzureWebJobsStorage (identity-based instead, see below), which is the single source of truth for names;
// tests/infra/test_bicep.py fails if a declared name is missing here.
// Values left '' mean "use the default declared in writeback/settings.py", so defaults live in one place;
// an operator overrides any of them with the appSettingOverrides parameter.
// Secrets are never literals: a secret setting is '' or a Key Vault reference
// (@Microsoft.KeyVault(SecretUri=...)) resolved by the platform with the app's managed identity.
// Connections are identity-based: no connection string, account key or SAS is set.

@description('Name of the function app.')
param name string

@description('Name of the Flex Consumption plan.')
param planName string

@description('Azure region (must offer Flex Consumption).')
param location string

@description('Tags applied to every resource; the app also gets azd-service-name.')
param tags object = {}

@description('Service name in azure.yaml (azd finds the app by the azd-service-name tag).')
param azdServiceName string = 'writeback'

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

@description('Storage account (runtime, deployment package, outcome tables).')
param storageAccountName string

@description('Blob container of the deployment package.')
param deploymentContainerName string

@description('Application Insights component name.')
param applicationInsightsName string

@description('Service Bus namespace host name, e.g. contoso.servicebus.windows.net.')
param serviceBusFullyQualifiedNamespace string

@description('Writeback queue name.')
param queueName string

@description('Table service endpoint of the storage account (OUTCOMES_TABLE_ENDPOINT).')
param tableEndpoint string

@description('Key Vault URI, e.g. https://kv-x.vault.azure.net/.')
param keyVaultUri string

@description('Base URL of the FHIR service.')
param fhirUrl string

@description('Python version of the Flex Consumption runtime (3.11 to 3.13 for new apps).')
@allowed([
  '3.11'
  '3.12'
  '3.13'
])
param pythonVersion string = '3.11'

@description('Most instances the app scales out to (protects the FHIR service from bursts).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory of one instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('WRITEBACK_TARGET: fhir or alternate.')
@allowed([
  'fhir'
  'alternate'
])
param writebackTarget string = 'fhir'

@description('WRITEBACK_IGNORE_USER_IDS: comma-separated Dataverse systemuser ids whose changes are echoes.')
param ignoreUserIds string = ''

@description('WRITEBACK_AGENT: Device/<id> or Organization/<id>; empty for the built-in Device.')
param writebackAgent string = ''

@description('ALTERNATE_ENDPOINT_URL (only with writebackTarget alternate).')
param alternateEndpointUrl string = ''

@description('ALTERNATE_TOKEN_URL (only with writebackTarget alternate).')
param alternateTokenUrl string = ''

@description('ALTERNATE_CLIENT_ID (only with writebackTarget alternate).')
param alternateClientId string = ''

@description('ALTERNATE_SCOPE (optional).')
param alternateScope string = ''

@description('Name of the Key Vault secret holding the alternate endpoint client secret (stored by the operator, not by this template).')
param alternateClientSecretName string = 'alternate-client-secret'

@description('Most messages one invocation of the batch trigger receives (host.json extensions.serviceBus.maxMessageBatchSize).')
@minValue(1)
@maxValue(1000)
param maxMessageBatchSize int = 100

@description('Peek-lock duration of the queue in seconds (servicebus.bicep); the app setting WRITEBACK_LOCK_DURATION_SECONDS, from which each invocation derives its deadline.')
@minValue(90)
@maxValue(300)
param lockDurationSeconds int = 300

@description('Extra or overriding app settings (name: value). Never put a secret here: use a @Microsoft.KeyVault(SecretUri=...) reference.')
param appSettingOverrides object = {}

// Versionless reference: the platform picks up a rotated secret within 24 hours.
var alternateClientSecretReference = '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/${alternateClientSecretName}/)'

var appSettings = {
  // --- Service Bus trigger (read by the Functions host) ---
  WRITEBACK_QUEUE_NAME: queueName
  // Identity-based trigger connection: namespace + managed identity, no SAS.
  ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identityClientId
  // Runtime storage, identity-based. The plain AzureWebJobsStorage (connection string) setting is deliberately
  // NOT set: the host would prefer it over the __accountName form, and shared-key access is disabled.
  AzureWebJobsStorage__accountName: storageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  // --- Decision ---
  WRITEBACK_MAPS_DIR: '' // the maps shipped in writeback/maps
  WRITEBACK_IGNORE_USER_IDS: ignoreUserIds
  WRITEBACK_CONSENT_COLUMN: '' // default msemr_azurefhirsyncenabled
  // --- FHIR server: the existing Health Data Services FHIR service, managed identity ---
  FHIR_URL: fhirUrl
  FHIR_TENANT_ID: '' // empty: managed identity, not a client secret
  FHIR_CLIENT_ID: identityClientId // the user-assigned managed identity (alone: no secret, no token URL)
  FHIR_CLIENT_SECRET: '' // secret; unused with a managed identity. If ever needed: a Key Vault reference, via appSettingOverrides
  FHIR_TOKEN_URL: '' // only for a non-Entra FHIR server
  FHIR_SCOPE: '' // default <FHIR_URL>/.default
  FHIR_TIMEOUT_SECONDS: ''
  FHIR_MAX_RETRIES: ''
  FHIR_RETRY_MAX_SECONDS: ''
  FHIR_CONFLICT_RETRIES: ''
  // --- What we stamp on writes ---
  WRITEBACK_META_SOURCE: '' // default urn:dataverse-fhir-writeback
  WRITEBACK_AGENT: writebackAgent
  // --- Alternate endpoint ---
  WRITEBACK_TARGET: writebackTarget
  ALTERNATE_ENDPOINT_URL: alternateEndpointUrl
  ALTERNATE_TOKEN_URL: alternateTokenUrl
  ALTERNATE_CLIENT_ID: alternateClientId
  // Secret: a Key Vault reference when the alternate target is used; otherwise '' (no dangling reference).
  ALTERNATE_CLIENT_SECRET: writebackTarget == 'alternate' ? alternateClientSecretReference : ''
  ALTERNATE_SCOPE: alternateScope
  // --- Outcome log and per-row state (Table Storage), identity-based ---
  OUTCOMES_TABLE_ENDPOINT: tableEndpoint
  OUTCOMES_CONNECTION_STRING: '' // secret; local/Azurite only. In Azure the endpoint + managed identity is used
  OUTCOMES_TABLE_PREFIX: '' // default writeback
  // --- Throughput ---
  WRITEBACK_MAX_CONCURRENCY: ''
  WRITEBACK_BUNDLE_SIZE: ''
  // --- Retries and the invocation deadline ---
  WRITEBACK_RETRY_FIRST_SECONDS: ''
  WRITEBACK_RETRY_MAX_DELAY_SECONDS: ''
  WRITEBACK_RETRY_WINDOW_HOURS: ''
  // The queue's lock duration, from the same parameter as the queue itself: the invocation deadline depends on it.
  WRITEBACK_LOCK_DURATION_SECONDS: string(lockDurationSeconds)
  WRITEBACK_CONSENT_WAIT_MINUTES: ''
  WRITEBACK_CONSENT_UNKNOWN: ''
  // The Service Bus extension needs protobuf/grpcio newer than the 3.11/3.12 worker bundles: load the app's own.
  PYTHON_ISOLATE_WORKER_DEPENDENCIES: '1'
  // --- Not in SETTINGS: platform and SDK settings ---
  // Messages per invocation of the batch trigger. The host reads AzureFunctionsJobHost__* as host.json overrides,
  // so the batch size is a deployment parameter rather than a change to the code package.
  AzureFunctionsJobHost__extensions__serviceBus__maxMessageBatchSize: string(maxMessageBatchSize)
  // DefaultAzureCredential/ManagedIdentityCredential in the app pick the user-assigned identity from this.
  AZURE_CLIENT_ID: identityClientId
  // Telemetry with Entra ID (local auth is disabled on the component, so the instrumentation key in the
  // connection string, added below, cannot ingest anything on its own). The Azure Monitor exporter reads this
  // too and authenticates with this managed identity (role Monitoring Metrics Publisher on the component).
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // OpenTelemetry (host.json telemetryMode OpenTelemetry): the Python worker configures the Azure Monitor
  // distro (azure-monitor-opentelemetry, in requirements.txt) and streams the app's log records itself, with
  // their `extra` fields as customDimensions; the host then stops forwarding the same records as plain text.
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
  // No dependency telemetry per HTTP call: httpx spans would carry FHIR search URLs with row ids, azure_sdk
  // one span per Table Storage call. Same list as writeback/telemetry.py DISABLED_INSTRUMENTATIONS.
  OTEL_PYTHON_DISABLED_INSTRUMENTATIONS: 'azure_sdk,django,fastapi,flask,httpx,psycopg2,requests,urllib,urllib3'
}

// Every value above is known when the deployment starts (a for-expression requires it); the one runtime
// value, the Application Insights connection string, is appended in the site below, read from the resource
// itself (never passed through a module output).
var appSettingsList = [for setting in items(union(appSettings, appSettingOverrides)): {
  name: setting.key
  value: setting.value
}]

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    // checkov:skip=CKV_AZURE_225: Zone redundancy of a Flex Consumption plan is only offered in some regions and adds cost; the writeback tolerates losing an instance or a zone by design, because Service Bus redelivers every message that was not completed.
    reserved: true
    zoneRedundant: false
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': azdServiceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    // checkov:skip=CKV_AZURE_17: The app has no HTTP-triggered function (Service Bus trigger only), so no client connects to it; requiring client certificates would add no protection.
    // checkov:skip=CKV_AZURE_222: Public network access stays enabled because azd deploys over the public deployment (scm) endpoint and this template has no private endpoints; the app exposes no HTTP function.
    // checkov:skip=CKV_AZURE_212: numberOfWorkers does not apply to Flex Consumption: the platform scales instances per trigger (maximumInstanceCount bounds it).
    // checkov:skip=CKV_AZURE_213: The app serves no HTTP traffic, so there is no health-check path; Flex Consumption replaces unhealthy instances itself.
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
      cors: {
        allowedOrigins: []
      }
      appSettings: concat(appSettingsList, [
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsights.properties.ConnectionString
        }
      ])
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// No FTP or basic-auth (publishing profile) deployment: azd deploys with the operator's Entra ID token.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = site.name
output id string = site.id
output defaultHostName string = site.properties.defaultHostName
