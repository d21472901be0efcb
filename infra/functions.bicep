// Function App on Flex Consumption (FC1, Linux, Python 3.12) with a user-assigned identity.
// Every storage connection is identity-based (`__credential=managedidentity` + `__clientId`); there is
// no connection string with a key anywhere. Runtime settings live in functionAppConfig (Flex Consumption
// takes neither FUNCTIONS_WORKER_RUNTIME nor WEBSITE_RUN_FROM_PACKAGE).

param location string
param tags object = {}
param planName string
param functionAppName string
@description('azd service name from azure.yaml; azd finds the app to deploy by this tag.')
param serviceName string = 'stylize'
param appIdentityId string
param appIdentityClientId string
param runtimeBlobEndpoint string
param runtimeQueueEndpoint string
param runtimeTableEndpoint string
param deploymentContainerName string
param dataBlobEndpoint string
param dataQueueEndpoint string
param inputContainerName string = 'input'
param stylesContainerName string = 'styles'
param outputContainerName string = 'output'
param workContainerName string = 'work'
param logsContainerName string = 'logs'
param batchAccountUrl string
param batchPoolId string
param batchWorkerImage string
param poolIdentityId string
@description('Client id of the Batch pool identity: workers ask IMDS for storage tokens with it')
param poolIdentityClientId string
param appInsightsConnectionString string
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048
@description('Always-ready instances of the `durable` group (orchestrators, activities, entities). Microsoft recommends 1 for Durable Functions on Flex Consumption; each is billed at rest (docs/deploy.md). 0 = scale to zero, with cold starts.')
@minValue(0)
@maxValue(10)
param durableAlwaysReadyInstanceCount int = 1

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
    // checkov:skip=CKV_AZURE_225: zone-redundant Flex Consumption keeps at least two always-ready instances per group, doubling the durable group's baseline cost; a zone outage delays this batch pipeline but loses nothing, its Durable state lives in Storage
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${appIdentityId}': {}
    }
  }
  properties: {
    // checkov:skip=CKV_AZURE_222: public on purpose: Event Grid delivers blob events to the webhook and clients poll the status endpoint; both use function keys
    // checkov:skip=CKV_AZURE_17: client certificates would break Event Grid webhook delivery; callers authenticate with function/system keys over HTTPS
    // checkov:skip=CKV_AZURE_212: siteConfig.numberOfWorkers does not apply to Flex Consumption, which scales per function group; the durable group keeps its always-ready instance (functionAppConfig.scaleAndConcurrency.alwaysReady)
    // checkov:skip=CKV_AZURE_213: no fixed instance pool to take unhealthy instances out of: Flex Consumption starts instances per demand; host health shows in Application Insights
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
        // Host storage (runtime account): Durable Functions needs blob, queue and table.
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: runtimeBlobEndpoint
        }
        {
          name: 'AzureWebJobsStorage__queueServiceUri'
          value: runtimeQueueEndpoint
        }
        {
          name: 'AzureWebJobsStorage__tableServiceUri'
          value: runtimeTableEndpoint
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: appIdentityClientId
        }
        // Blob trigger connection (data account); the queue is for the trigger's poison messages.
        {
          name: 'DataStorage__blobServiceUri'
          value: dataBlobEndpoint
        }
        {
          name: 'DataStorage__queueServiceUri'
          value: dataQueueEndpoint
        }
        {
          name: 'DataStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'DataStorage__clientId'
          value: appIdentityClientId
        }
        // What pipeline/settings.py reads.
        {
          name: 'STYLIZE_STORAGE'
          value: 'blob'
        }
        {
          name: 'DATA_STORAGE_ACCOUNT_URL'
          value: dataBlobEndpoint
        }
        {
          name: 'INPUT_CONTAINER'
          value: inputContainerName
        }
        {
          name: 'STYLES_CONTAINER'
          value: stylesContainerName
        }
        {
          name: 'OUTPUT_CONTAINER'
          value: outputContainerName
        }
        {
          name: 'WORK_CONTAINER'
          value: workContainerName
        }
        {
          name: 'LOGS_CONTAINER'
          value: logsContainerName
        }
        {
          name: 'STYLIZE_COMPUTE'
          value: 'batch'
        }
        {
          name: 'BATCH_ACCOUNT_URL'
          value: batchAccountUrl
        }
        {
          name: 'BATCH_POOL_ID'
          value: batchPoolId
        }
        {
          name: 'BATCH_WORKER_IMAGE'
          value: batchWorkerImage
        }
        {
          name: 'BATCH_POOL_IDENTITY_RESOURCE_ID'
          value: poolIdentityId
        }
        {
          name: 'BATCH_POOL_IDENTITY_CLIENT_ID'
          value: poolIdentityClientId
        }
        // DefaultAzureCredential picks the user-assigned identity by this client id.
        {
          name: 'AZURE_CLIENT_ID'
          value: appIdentityClientId
        }
        // Telemetry: local auth is disabled on the component, so the app signs in with its identity.
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${appIdentityClientId};Authorization=AAD'
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${runtimeBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: appIdentityId
          }
        }
      }
      scaleAndConcurrency: {
        // Microsoft's guidance for Durable Functions on Flex Consumption: one always-ready instance for the
        // `durable` group, so orchestrator and activity messages do not wait for a cold start (host.json
        // caps the queue polling interval at 10 s for the same reason).
        alwaysReady: [
          {
            name: 'durable'
            instanceCount: durableAlwaysReadyInstanceCount
          }
        ]
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      // The newest Python that Flex Consumption runs GA and that every pin in requirements.txt installs on
      // (azure-functions 1.26.0 declares Python < 3.13). README and docs/deploy.md state it; a test checks.
      runtime: {
        name: 'python'
        version: '3.12'
      }
    }
  }
}

output functionAppName string = functionApp.name
output functionAppHostName string = functionApp.properties.defaultHostName
output functionAppUrl string = 'https://${functionApp.properties.defaultHostName}'
