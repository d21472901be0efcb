// User-assigned identities: one for the Function App, one for the Batch pool's nodes.
// Their role assignments live in roles.bicep, one per need.

param location string
param tags object = {}
param appIdentityName string
param poolIdentityName string

resource appIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: appIdentityName
  location: location
  tags: tags
}

resource poolIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: poolIdentityName
  location: location
  tags: tags
}

output appIdentityId string = appIdentity.id
output appIdentityClientId string = appIdentity.properties.clientId
output appIdentityPrincipalId string = appIdentity.properties.principalId
output poolIdentityId string = poolIdentity.id
output poolIdentityClientId string = poolIdentity.properties.clientId
output poolIdentityPrincipalId string = poolIdentity.properties.principalId
