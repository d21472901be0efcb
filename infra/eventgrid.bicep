// Event Grid subscription: BlobCreated in the `input` container → the blob trigger `on_video_uploaded`
// (source=EventGrid) through the Functions blob-extension webhook.
// Not part of main.bicep: infra/hooks/postdeploy.sh deploys it after `azd deploy`, because the webhook
// key (`blobs_extension` system key) exists only once the code runs, and Event Grid validates the
// endpoint while it creates the subscription.

@description('Name of the Event Grid system topic on the data storage account (main.bicep output).')
param systemTopicName string

@description('Default host name of the Function App, without scheme.')
param functionAppHostName string

@description('Function name of the blob trigger, as declared in function_app.py.')
param functionName string = 'on_video_uploaded'

@description('The Function App\'s `blobs_extension` system key.')
@secure()
param blobsExtensionKey string

param subscriptionName string = 'input-blob-created'

@description('Container of the data account where uploads Event Grid could not deliver go (its blob-created events).')
param deadLetterContainerName string = 'logs'

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: subscriptionName
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${functionAppHostName}/runtime/webhooks/blobs?functionName=Host.Functions.${functionName}&code=${uriComponent(blobsExtensionKey)}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/input/'
    }
    eventDeliverySchema: 'EventGridSchema'
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    // After a day of failed deliveries (the app down or misconfigured) an upload's event is kept rather than
    // dropped: written by the topic's own identity to the data account, where it names the blob to start again.
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: systemTopic.properties.source
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output subscriptionName string = subscription.name
