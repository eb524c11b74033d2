// FHIR Data Contributor for the function app's managed identity on the EXISTING Azure Health Data Services
// FHIR service. Deployed at the FHIR service's resource group (main.bicep sets the module scope from
// fhirServiceResourceId), so the deploying principal needs permission to create role assignments there
// (Owner, User Access Administrator or Role Based Access Control Administrator on the FHIR service).
// Nothing else about the FHIR service is changed.

@description('Name of the Health Data Services workspace holding the FHIR service.')
param workspaceName string

@description('Name of the FHIR service inside the workspace.')
param fhirServiceName string

@description('Principal (object) id of the function app\'s managed identity.')
param principalId string

// FHIR Data Contributor (built-in): full access to FHIR data; no control-plane rights, no SMART-on-FHIR action.
var fhirDataContributorRoleId = '5a1fc7df-4bf1-4951-a576-89034ee01acd'

resource workspace 'Microsoft.HealthcareApis/workspaces@2023-11-01' existing = {
  name: workspaceName
}

resource fhirService 'Microsoft.HealthcareApis/workspaces/fhirservices@2023-11-01' existing = {
  parent: workspace
  name: fhirServiceName
}

resource fhirDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(fhirService.id, principalId, fhirDataContributorRoleId)
  scope: fhirService
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', fhirDataContributorRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Dataverse-to-FHIR writeback function: read and write FHIR resources.'
  }
}

output fhirServiceId string = fhirService.id
