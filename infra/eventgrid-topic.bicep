// Event Grid system topic on the data storage account. Provisioned with the rest (`azd provision`);
// its subscription to the Function App's blob-trigger webhook is eventgrid.bicep, deployed by the
// postdeploy hook once the code is running (Event Grid validates the endpoint when it subscribes).

param location string
param tags object = {}
param systemTopicName string
param dataAccountName string

resource dataAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: dataAccountName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: systemTopicName
  location: location
  tags: tags
  // Its own identity writes the events it could not deliver to the logs container (eventgrid.bicep, roles.bicep).
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: dataAccount.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output systemTopicName string = systemTopic.name
output systemTopicPrincipalId string = systemTopic.identity.principalId
