// Two storage accounts, both keyless (no shared key, no SAS, no public blobs, HTTPS + TLS 1.2 only):
//  - data: the pipeline's containers (input, styles, output, work, logs); source of the Event Grid events.
//  - runtime: the Function App's own storage (AzureWebJobsStorage: Durable Functions task hub, host
//    locks and keys) and the Flex Consumption deployment package container.
// Public network access stays on: Flex Consumption without VNet integration and Batch nodes with
// Batch-managed public IPs reach them over the internet, authenticated by Entra ID only.

param location string
param tags object = {}
@minLength(3)
@maxLength(24)
param dataAccountName string
@minLength(3)
@maxLength(24)
param runtimeAccountName string
param deploymentContainerName string = 'deploymentpackage'
param inputContainerName string = 'input'
param stylesContainerName string = 'styles'
param outputContainerName string = 'output'
param workContainerName string = 'work'
param logsContainerName string = 'logs'

resource dataAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: dataAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    // checkov:skip=CKV_AZURE_43: the name is a parameter; main.bicep builds it from a lowercase alphanumeric uniqueString token, 3-24 chars enforced by @minLength/@maxLength
    // checkov:skip=CKV_AZURE_35: the Function App (Flex Consumption without VNet) and Batch nodes (Batch-managed public IPs) have no fixed addresses to allow; access is Entra ID only (no shared key, no SAS)
    // checkov:skip=CKV_AZURE_59: same reason: public endpoint needed, authenticated by Entra ID RBAC only
    // checkov:skip=CKV_AZURE_206: LRS on purpose: inputs can be uploaded again and work/ is scratch deleted after a day; pick GZRS if outputs must survive a zone or region loss
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    isLocalUserEnabled: false
    isSftpEnabled: false
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource dataBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: dataAccount
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource inputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobService
  name: inputContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource stylesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobService
  name: stylesContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource outputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobService
  name: outputContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource workContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobService
  name: workContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource logsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobService
  name: logsContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Segments in work/ are scratch: a finished job deletes them, this rule catches the ones left behind.
// Task logs in logs/ are kept on purpose (cleanup leaves them for diagnosis), for 30 days, and so are the runs'
// end records (logs/ended/): a step of an ended run that arrives within them is refused.
resource dataLifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: dataAccount
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'delete-work-after-1-day'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${workContainerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: 1
                }
              }
            }
          }
        }
        {
          name: 'delete-task-logs-after-30-days'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${logsContainerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: 30
                }
              }
            }
          }
        }
      ]
    }
  }
}

resource runtimeAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: runtimeAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    // checkov:skip=CKV_AZURE_43: the name is a parameter; main.bicep builds it from a lowercase alphanumeric uniqueString token, 3-24 chars enforced by @minLength/@maxLength
    // checkov:skip=CKV_AZURE_35: the Flex Consumption app has no VNet integration and no fixed outbound address; access is Entra ID only (no shared key)
    // checkov:skip=CKV_AZURE_59: same reason: the Functions host reaches its storage over the public endpoint with its managed identity
    // checkov:skip=CKV_AZURE_206: LRS on purpose: Durable task hub state and the deployment package are rebuilt by `azd deploy` and by re-submitting a video
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    isLocalUserEnabled: false
    isSftpEnabled: false
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource runtimeBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: runtimeAccount
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: runtimeBlobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

output dataAccountName string = dataAccount.name
output dataAccountId string = dataAccount.id
output dataBlobEndpoint string = dataAccount.properties.primaryEndpoints.blob
output dataQueueEndpoint string = dataAccount.properties.primaryEndpoints.queue
output runtimeAccountName string = runtimeAccount.name
output runtimeBlobEndpoint string = runtimeAccount.properties.primaryEndpoints.blob
output runtimeQueueEndpoint string = runtimeAccount.properties.primaryEndpoints.queue
output runtimeTableEndpoint string = runtimeAccount.properties.primaryEndpoints.table
output deploymentContainerName string = deploymentContainer.name
output inputContainerName string = inputContainer.name
output stylesContainerName string = stylesContainer.name
output outputContainerName string = outputContainer.name
output workContainerName string = workContainer.name
output logsContainerName string = logsContainer.name
