// Azure Container Registry for the GPU worker image (stylize-worker). No admin user: the Batch pool
// pulls with its user-assigned identity (AcrPull), people push with `az acr build` (Entra ID).

param location string
param tags object = {}
param registryName string

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: registryName
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  properties: {
    // checkov:skip=CKV_AZURE_139: private networking needs the Premium SKU and private endpoints; Batch nodes with Batch-managed public IPs pull over the public endpoint with Entra ID (AcrPull), anonymous pull is off
    // checkov:skip=CKV_AZURE_163: image vulnerability scanning is Microsoft Defender for Containers, a subscription-level plan outside this template; enable it there
    // checkov:skip=CKV_AZURE_166: quarantine needs the Premium SKU; the only image is built from this repo by `az acr build`
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

output registryName string = registry.name
output loginServer string = registry.properties.loginServer
