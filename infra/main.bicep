// Video stylize on Azure: Functions (Flex Consumption, Durable) + Batch GPU pool + Storage + Event Grid,
// keyless end to end (managed identities and Entra ID; no account keys, no SAS, no connection strings
// with secrets). Deployed by `azd up`; the Event Grid subscription comes after code deploy, from the
// postdeploy hook (infra/hooks/postdeploy.sh → infra/eventgrid.bicep).
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; also seeds the names of all resources.')
param environmentName string

@minLength(1)
@description('Region of the resource group and of every resource, unless batchLocation says otherwise. Must offer Flex Consumption.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Region of the Batch account and its GPU pool; empty = location. Pick one where you have GPU quota.')
param batchLocation string = ''

@description('Object id of the person (or CI principal) running azd, for upload/read rights on the data containers and job rights on the Batch account; empty = none.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
param principalType string = 'User'

@description('GPU VM size of the Batch pool. Alternatives: Standard_NC24ads_A100_v4, Standard_NC40ads_H100_v5 (see docs/deploy.md).')
param batchVmSize string = 'Standard_NC4as_T4_v3'

@description('Most GPU nodes the pool may autoscale to.')
@minValue(1)
@maxValue(100)
param batchMaxNodes int = 4

@description('Pinned version of the microsoft-dsvm/ubuntu-hpc/2404 image for the pool (its NVIDIA driver must support CUDA 13.0, which the worker image uses).')
param batchImageVersion string = '24.04.2026072901'

@description('Worker image; empty = <registry login server>/stylize-worker:latest.')
param workerImage string = ''

@description('Most Flex Consumption instances the Function App may scale to.')
@minValue(1)
@maxValue(1000)
param functionMaximumInstanceCount int = 40

@description('Always-ready instances for the Durable Functions group (Microsoft recommends 1 on Flex Consumption; billed at rest, see docs/deploy.md). 0 = scale to zero.')
@minValue(0)
@maxValue(10)
param durableAlwaysReadyInstances int = 1

@description('Email address notified when a job fails (Azure Monitor alert); empty = the alert shows in the portal only.')
param alertEmail string = ''

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var poolLocation = empty(batchLocation) ? location : batchLocation
var functionAppName = 'func-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    location: location
    tags: tags
    appIdentityName: 'id-app-${resourceToken}'
    poolIdentityName: 'id-pool-${resourceToken}'
  }
}

module monitoring 'monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    location: location
    tags: tags
    logAnalyticsName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
  }
}

module monitoringWorkbook 'monitoring/workbook.bicep' = {
  name: 'monitoring-workbook'
  scope: rg
  params: {
    location: location
    tags: tags
    appInsightsName: monitoring.outputs.appInsightsName
    alertEmail: alertEmail
  }
}

module storage 'storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    location: location
    tags: tags
    dataAccountName: 'stdata${resourceToken}'
    runtimeAccountName: 'strt${resourceToken}'
    deploymentContainerName: 'deploymentpackage'
    inputContainerName: 'input'
    stylesContainerName: 'styles'
    outputContainerName: 'output'
    workContainerName: 'work'
    logsContainerName: 'logs'
  }
}

module registry 'registry.bicep' = {
  name: 'registry'
  scope: rg
  params: {
    location: location
    tags: tags
    registryName: 'cr${resourceToken}'
  }
}

var batchWorkerImage = empty(workerImage) ? '${registry.outputs.loginServer}/stylize-worker:latest' : workerImage

module batch 'batch.bicep' = {
  name: 'batch'
  scope: rg
  params: {
    location: poolLocation
    tags: tags
    batchAccountName: 'ba${resourceToken}'
    poolId: 'stylize-gpu'
    poolIdentityId: identity.outputs.poolIdentityId
    registryLoginServer: registry.outputs.loginServer
    workerImage: batchWorkerImage
    vmSize: batchVmSize
    maxNodes: batchMaxNodes
    imageVersion: batchImageVersion
  }
}

module eventgridTopic 'eventgrid-topic.bicep' = {
  name: 'eventgrid-topic'
  scope: rg
  params: {
    location: location
    tags: tags
    systemTopicName: 'evgt-data-${resourceToken}'
    dataAccountName: storage.outputs.dataAccountName
  }
}

module functions 'functions.bicep' = {
  name: 'functions'
  scope: rg
  params: {
    location: location
    tags: tags
    planName: 'plan-${resourceToken}'
    functionAppName: functionAppName
    serviceName: 'stylize'
    appIdentityId: identity.outputs.appIdentityId
    appIdentityClientId: identity.outputs.appIdentityClientId
    runtimeBlobEndpoint: storage.outputs.runtimeBlobEndpoint
    runtimeQueueEndpoint: storage.outputs.runtimeQueueEndpoint
    runtimeTableEndpoint: storage.outputs.runtimeTableEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    dataBlobEndpoint: storage.outputs.dataBlobEndpoint
    dataQueueEndpoint: storage.outputs.dataQueueEndpoint
    inputContainerName: storage.outputs.inputContainerName
    stylesContainerName: storage.outputs.stylesContainerName
    outputContainerName: storage.outputs.outputContainerName
    workContainerName: storage.outputs.workContainerName
    logsContainerName: storage.outputs.logsContainerName
    batchAccountUrl: batch.outputs.accountUrl
    batchPoolId: batch.outputs.poolId
    batchWorkerImage: batchWorkerImage
    poolIdentityId: identity.outputs.poolIdentityId
    poolIdentityClientId: identity.outputs.poolIdentityClientId
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    maximumInstanceCount: functionMaximumInstanceCount
    durableAlwaysReadyInstanceCount: durableAlwaysReadyInstances
  }
}

module roles 'roles.bicep' = {
  name: 'roles'
  scope: rg
  params: {
    appPrincipalId: identity.outputs.appIdentityPrincipalId
    poolPrincipalId: identity.outputs.poolIdentityPrincipalId
    eventGridPrincipalId: eventgridTopic.outputs.systemTopicPrincipalId
    userPrincipalId: principalId
    userPrincipalType: principalType
    dataAccountName: storage.outputs.dataAccountName
    runtimeAccountName: storage.outputs.runtimeAccountName
    batchAccountName: batch.outputs.batchAccountName
    registryName: registry.outputs.registryName
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

// azd stores these in the environment (.azure/<env>/.env); the hook and docs/deploy.md use them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
// The subscription this deployment went to: the hooks pass it to every `az` call, whatever az's default is.
output AZURE_SUBSCRIPTION_ID string = subscription().subscriptionId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functions.outputs.functionAppName
output AZURE_FUNCTION_APP_URL string = functions.outputs.functionAppUrl
output AZURE_FUNCTION_APP_HOSTNAME string = functions.outputs.functionAppHostName
output AZURE_APP_IDENTITY_CLIENT_ID string = identity.outputs.appIdentityClientId
output DATA_STORAGE_ACCOUNT_NAME string = storage.outputs.dataAccountName
output DATA_STORAGE_ACCOUNT_URL string = storage.outputs.dataBlobEndpoint
output INPUT_CONTAINER string = storage.outputs.inputContainerName
output STYLES_CONTAINER string = storage.outputs.stylesContainerName
output OUTPUT_CONTAINER string = storage.outputs.outputContainerName
output WORK_CONTAINER string = storage.outputs.workContainerName
output LOGS_CONTAINER string = storage.outputs.logsContainerName
output RUNTIME_STORAGE_ACCOUNT_NAME string = storage.outputs.runtimeAccountName
output BATCH_ACCOUNT_NAME string = batch.outputs.batchAccountName
output BATCH_ACCOUNT_URL string = batch.outputs.accountUrl
output BATCH_POOL_ID string = batch.outputs.poolId
output BATCH_WORKER_IMAGE string = batchWorkerImage
output BATCH_POOL_IDENTITY_RESOURCE_ID string = identity.outputs.poolIdentityId
output BATCH_POOL_IDENTITY_CLIENT_ID string = identity.outputs.poolIdentityClientId
output AZURE_CONTAINER_REGISTRY_NAME string = registry.outputs.registryName
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = registry.outputs.loginServer
output EVENTGRID_SYSTEM_TOPIC_NAME string = eventgridTopic.outputs.systemTopicName
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.appInsightsName
output APPLICATIONINSIGHTS_CONNECTION_STRING string = monitoring.outputs.appInsightsConnectionString
