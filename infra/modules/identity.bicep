// User-assigned managed identity of the function app.
// A user-assigned identity (rather than system-assigned) exists before the app, so every role assignment
// is in place before the Functions host first starts and tries to reach Storage, Service Bus and FHIR;
// it also survives re-creating the app. It is the only identity the app uses: runtime storage, the
// Service Bus trigger, the outcome tables, Key Vault references, Application Insights and the FHIR service.

@description('Name of the user-assigned managed identity.')
param name string

@description('Azure region.')
param location string

@description('Tags applied to the resource.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
