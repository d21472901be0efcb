#!/bin/sh
# azd postdeploy hook: subscribe the blob trigger `on_video_uploaded` to BlobCreated events of the
# `input` container (infra/eventgrid.bicep, a deployment of its own in the environment's resource group).
#
# Why here and not in main.bicep: the webhook URL carries the Function App's `blobs_extension` system
# key, which exists only once the deployed code has started, and Event Grid calls the endpoint to
# validate it while it creates the subscription. main.bicep provisions the system topic; this adds the
# subscription. Re-running it (every `azd deploy`) updates the same subscription in place.
#
# azd passes the environment's values (main.bicep outputs) as environment variables.
set -eu

: "${AZURE_RESOURCE_GROUP:?not set: run through azd (azd up / azd deploy) or export the azd env values}"
: "${AZURE_FUNCTION_APP_NAME:?not set: run through azd}"
: "${AZURE_FUNCTION_APP_HOSTNAME:?not set: run through azd}"
: "${EVENTGRID_SYSTEM_TOPIC_NAME:?not set: run through azd}"

infra_dir=$(cd "$(dirname "$0")/.." && pwd)
attempts=${POSTDEPLOY_KEY_ATTEMPTS:-30}
delay=${POSTDEPLOY_KEY_DELAY_SECONDS:-10}

echo "postdeploy: waiting for the blobs_extension system key of $AZURE_FUNCTION_APP_NAME"
key=""
n=0
while :; do
    n=$((n + 1))
    # Listing keys also wakes the host, which creates the key when it loads the blob extension.
    key=$(az functionapp keys list --resource-group "$AZURE_RESOURCE_GROUP" --name "$AZURE_FUNCTION_APP_NAME" \
        --query "systemKeys.blobs_extension" --output tsv 2>/dev/null || true)
    if [ -n "$key" ] && [ "$key" != "None" ]; then
        break
    fi
    if [ "$n" -ge "$attempts" ]; then
        echo "postdeploy: no blobs_extension key after $attempts tries. Is on_video_uploaded indexed?" >&2
        echo "  az functionapp function list -g $AZURE_RESOURCE_GROUP -n $AZURE_FUNCTION_APP_NAME -o table" >&2
        exit 1
    fi
    sleep "$delay"
done

# The key goes through a parameters file readable by this user only, not the command line.
params=$(mktemp)
trap 'rm -f "$params"' EXIT INT TERM
chmod 600 "$params"
cat >"$params" <<JSON
{
  "\$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
  "contentVersion": "1.0.0.0",
  "parameters": {
    "systemTopicName": { "value": "$EVENTGRID_SYSTEM_TOPIC_NAME" },
    "functionAppHostName": { "value": "$AZURE_FUNCTION_APP_HOSTNAME" },
    "blobsExtensionKey": { "value": "$key" }
  }
}
JSON

echo "postdeploy: creating Event Grid subscription input-blob-created on $EVENTGRID_SYSTEM_TOPIC_NAME"
az deployment group create \
    --resource-group "$AZURE_RESOURCE_GROUP" \
    --name "eventgrid-input-blob-created" \
    --template-file "$infra_dir/eventgrid.bicep" \
    --parameters "@$params" \
    --output none
echo "postdeploy: done; new blobs in the input container now start stylize_video"
