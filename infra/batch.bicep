// Azure Batch account (Batch-service pool allocation, Entra ID auth only) and the GPU pool of dedicated nodes.
// The pool is defined here, through ARM, because only ARM can give a pool a user-assigned identity: the
// nodes use it to pull the worker image from ACR (AcrPull) and to read/write blobs (roles.bicep).
// The pool autoscales from 0 nodes on $PendingTasks; the formula template is autoscale-formula.txt, the
// same file that pipeline/autoscale.py fills, so Bicep and Python cannot drift apart.

param location string
param tags object = {}
param batchAccountName string
param poolId string = 'stylize-gpu'
param poolIdentityId string
param registryLoginServer string
param workerImage string

@description('GPU VM size for the pool (one task per node). Needs dedicated core quota for its family in the Batch account.')
param vmSize string = 'Standard_NC4as_T4_v3'

@description('Upper bound of nodes the autoscale formula may ask for.')
@minValue(1)
@maxValue(100)
param maxNodes int = 4

// The ubuntu-hpc image keeps Docker's data root (/var/lib/docker) on the OS disk, which its HPC stack already
// fills much of, and the worker image (torch's CUDA wheels) takes several GB there once pulled and unpacked.
@description('OS disk size of each node in GB: room for the pulled worker image besides the HPC image itself.')
@minValue(64)
param osDiskSizeGB int = 128

@description('Pinned version of the microsoft-dsvm/ubuntu-hpc/2404 marketplace image (NVIDIA driver 580.173.02, CUDA 13.0, as the torch of the worker image needs).')
param imageVersion string = '24.04.2026072901'

// Dedicated nodes only ({1} = 0): a Batch-service-mode account can no longer get low-priority nodes (retired
// 30 Sep 2025), and Spot nodes need an account in user-subscription mode (docs/deploy.md, "Spot nodes").
var autoscaleFormula = format(loadTextContent('autoscale-formula.txt'), maxNodes, 0)

resource batchAccount 'Microsoft.Batch/batchAccounts@2024-07-01' = {
  name: batchAccountName
  location: location
  tags: tags
  properties: {
    // checkov:skip=CKV_AZURE_76: data at rest uses Microsoft-managed keys; customer-managed keys would add a Key Vault and its identity for no gain here (inputs and outputs live in Storage, not in Batch)
    poolAllocationMode: 'BatchService'
    allowedAuthenticationModes: [
      'AAD'
    ]
    // Public endpoint on purpose: the Function App (Flex Consumption, no VNet) submits jobs over the
    // internet with its managed identity (Azure Batch Job Submitter); shared-key and task-token auth are off.
    publicNetworkAccess: 'Enabled'
    encryption: {
      keySource: 'Microsoft.Batch'
    }
  }
}

resource pool 'Microsoft.Batch/batchAccounts/pools@2024-07-01' = {
  parent: batchAccount
  name: poolId
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${poolIdentityId}': {}
    }
  }
  properties: {
    displayName: 'Video stylize GPU workers'
    vmSize: vmSize
    taskSlotsPerNode: 1
    taskSchedulingPolicy: {
      nodeFillType: 'Spread'
    }
    interNodeCommunication: 'Disabled'
    targetNodeCommunicationMode: 'Simplified'
    deploymentConfiguration: {
      virtualMachineConfiguration: {
        imageReference: {
          publisher: 'microsoft-dsvm'
          offer: 'ubuntu-hpc'
          sku: '2404'
          version: imageVersion
        }
        nodeAgentSkuId: 'batch.node.ubuntu 24.04'
        osDisk: {
          diskSizeGB: osDiskSizeGB
        }
        containerConfiguration: {
          type: 'DockerCompatible'
          // Pre-fetched when a node starts, so the first task on it does not wait for the pull.
          containerImageNames: [
            workerImage
          ]
          containerRegistries: [
            {
              registryServer: registryLoginServer
              identityReference: {
                resourceId: poolIdentityId
              }
            }
          ]
        }
      }
    }
    scaleSettings: {
      autoScale: {
        formula: autoscaleFormula
        evaluationInterval: 'PT5M'
      }
    }
  }
}

output batchAccountName string = batchAccount.name
output accountEndpoint string = batchAccount.properties.accountEndpoint
output accountUrl string = 'https://${batchAccount.properties.accountEndpoint}'
output poolId string = pool.name
