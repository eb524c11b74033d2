// Key Vault (Azure RBAC authorization) holding the alternate endpoint's client secret.
// Bicep never writes a secret: the operator stores it (docs/deploy.md) and the function app reads it
// through a Key Vault reference in its app settings, with its managed identity (Key Vault Secrets User).

@description('Name of the Key Vault (3-24 characters).')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Resource id of the Log Analytics workspace receiving the vault audit logs.')
param logAnalyticsWorkspaceId string

@description('Optional object id of the operator (user or group) who stores the alternate endpoint secret: gets Key Vault Secrets Officer on this vault. Empty: no assignment (grant it yourself).')
param secretsOfficerPrincipalId string = ''

@description('Principal type of secretsOfficerPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param secretsOfficerPrincipalType string = 'User'

// Key Vault Secrets Officer (built-in): manage secrets, no access to keys, certificates or role assignments.
var keyVaultSecretsOfficerRoleId = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    // checkov:skip=CKV_AZURE_189: The function app resolves Key Vault references over the public endpoint because this template deploys no VNet integration or private endpoints; data-plane access still requires Entra ID and an RBAC role.
    // checkov:skip=CKV_AZURE_109: A default-deny firewall would block the Key Vault references of a function app without VNet integration (App Service is not a trusted service for references); access is limited by Azure RBAC instead.
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource auditLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit-to-log-analytics'
  scope: vault
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
  }
}

resource secretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(secretsOfficerPrincipalId)) {
  name: guid(vault.id, secretsOfficerPrincipalId, keyVaultSecretsOfficerRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficerRoleId)
    principalId: secretsOfficerPrincipalId
    principalType: secretsOfficerPrincipalType
    description: 'Operator stores the alternate endpoint client secret.'
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
