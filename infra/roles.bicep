// Role assignments, one per need, each at the narrowest scope that need allows.
//
// Function App identity (app):
//   data account     Storage Blob Data Contributor   read input/styles, write work/output/logs, blob trigger
//   data account     Storage Queue Data Contributor  the blob trigger's poison queue lives on the trigger's account
//   runtime account  Storage Blob Data Owner         host storage + Flex Consumption deployment package
//   runtime account  Storage Queue Data Contributor  Durable Functions work-item and control queues
//   runtime account  Storage Table Data Contributor  Durable Functions history and instance tables
//   Batch account    Azure Batch Job Submitter       create jobs and tasks, read their state
//   App Insights     Monitoring Metrics Publisher    keyless telemetry (DisableLocalAuth)
// Batch pool identity (pool), container scope on the data account:
//   input, styles         Storage Blob Data Reader
//   work, logs            Storage Blob Data Contributor   (segments and the stitched video go to work;
//                                                        the app publishes outputs, so the pool cannot overwrite them)
//   registry              AcrPull
// Event Grid system topic on the data account (eventGrid), container scope:
//   logs                  Storage Blob Data Contributor   the upload events it could not deliver (dead letters)
// The person running `azd up` (optional, principalId from azd):
//   input, styles         Storage Blob Data Contributor   upload videos and style images
//   output                Storage Blob Data Reader        download results
//   logs                  Storage Blob Data Reader        read the GPU tasks' stdout/stderr and runs' end records
//   Batch account         Azure Batch Job Submitter       list and delete jobs by hand (docs/batch.md); jobs are
//                                                        data-plane objects, which Owner/Contributor do not cover

param appPrincipalId string
param poolPrincipalId string
param eventGridPrincipalId string
@description('Object id of the user (or CI principal) running azd; empty to grant nothing.')
param userPrincipalId string = ''
@allowed([
  'User'
  'ServicePrincipal'
])
param userPrincipalType string = 'User'
param dataAccountName string
param runtimeAccountName string
param batchAccountName string
param registryName string
param appInsightsName string

var roleIds = {
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  batchJobSubmitter: '48e5e92e-a480-4e71-aa9c-2778f4c13781'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  acrPull: '7f951dda-4ed3-4680-a7ca-43fe172d538d'
}

resource dataAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: dataAccountName
}

resource dataBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: dataAccount
  name: 'default'
}

// Container scopes, declared flat (not nested) so pycep-parser and checkov see each of them.
resource inputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: dataBlobService
  name: 'input'
}

resource stylesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: dataBlobService
  name: 'styles'
}

resource outputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: dataBlobService
  name: 'output'
}

resource workContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: dataBlobService
  name: 'work'
}

resource logsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: dataBlobService
  name: 'logs'
}

resource runtimeAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: runtimeAccountName
}

resource batchAccount 'Microsoft.Batch/batchAccounts@2024-07-01' existing = {
  name: batchAccountName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// ---- Function App identity ----

resource appDataBlob 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dataAccount.id, appPrincipalId, roleIds.storageBlobDataContributor)
  scope: dataAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appDataQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dataAccount.id, appPrincipalId, roleIds.storageQueueDataContributor)
  scope: dataAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appRuntimeBlob 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(runtimeAccount.id, appPrincipalId, roleIds.storageBlobDataOwner)
  scope: runtimeAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appRuntimeQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(runtimeAccount.id, appPrincipalId, roleIds.storageQueueDataContributor)
  scope: runtimeAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appRuntimeTable 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(runtimeAccount.id, appPrincipalId, roleIds.storageTableDataContributor)
  scope: runtimeAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appBatch 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(batchAccount.id, appPrincipalId, roleIds.batchJobSubmitter)
  scope: batchAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.batchJobSubmitter)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, appPrincipalId, roleIds.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ---- Batch pool identity ----

resource poolInput 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(inputContainer.id, poolPrincipalId, roleIds.storageBlobDataReader)
  scope: inputContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: poolPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource poolStyles 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(stylesContainer.id, poolPrincipalId, roleIds.storageBlobDataReader)
  scope: stylesContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: poolPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource poolWork 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workContainer.id, poolPrincipalId, roleIds.storageBlobDataContributor)
  scope: workContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: poolPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource poolLogs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(logsContainer.id, poolPrincipalId, roleIds.storageBlobDataContributor)
  scope: logsContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: poolPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource eventGridDeadLetters 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(logsContainer.id, eventGridPrincipalId, roleIds.storageBlobDataContributor)
  scope: logsContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: eventGridPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource poolAcrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, poolPrincipalId, roleIds.acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.acrPull)
    principalId: poolPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ---- The person deploying (optional): try the pipeline with `az storage blob upload --auth-mode login` ----

resource userInput 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(inputContainer.id, userPrincipalId, roleIds.storageBlobDataContributor)
  scope: inputContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

resource userStyles 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(stylesContainer.id, userPrincipalId, roleIds.storageBlobDataContributor)
  scope: stylesContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

resource userOutput 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(outputContainer.id, userPrincipalId, roleIds.storageBlobDataReader)
  scope: outputContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

resource userLogs 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(logsContainer.id, userPrincipalId, roleIds.storageBlobDataReader)
  scope: logsContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

resource userBatch 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(batchAccount.id, userPrincipalId, roleIds.batchJobSubmitter)
  scope: batchAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.batchJobSubmitter)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}
