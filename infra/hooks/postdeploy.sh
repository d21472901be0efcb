#!/bin/sh
# azd postdeploy hook (Linux, macOS, WSL; infra/hooks/postdeploy.ps1 is the Windows twin, keep them in step):
# build the worker image if the registry lacks it, then subscribe the blob trigger `on_video_uploaded` to BlobCreated events of the `input` container
# (infra/eventgrid.bicep, a deployment of its own in the environment's resource group).
#
# Why here and not in main.bicep: the webhook URL carries the Function App's `blobs_extension` system
# key, which exists only once the deployed code has started, and Event Grid calls the endpoint to
# validate it while it creates the subscription. main.bicep provisions the system topic; this adds the
# subscription. Re-running it (every `azd deploy`) updates the same subscription in place.
#
# azd passes the environment's values (main.bicep outputs) as environment variables. Every `az` call names
# the environment's subscription: az's own default subscription may be another one, and then the key
# lookup would fail as "not found" for every try.
set -eu

: "${AZURE_SUBSCRIPTION_ID:?not set: run through azd (azd up / azd deploy) or export the azd env values}"
: "${AZURE_RESOURCE_GROUP:?not set: run through azd}"
: "${AZURE_FUNCTION_APP_NAME:?not set: run through azd}"
: "${AZURE_FUNCTION_APP_HOSTNAME:?not set: run through azd}"
: "${EVENTGRID_SYSTEM_TOPIC_NAME:?not set: run through azd}"
: "${AZURE_CONTAINER_REGISTRY_NAME:?not set: run through azd}"
: "${BATCH_WORKER_IMAGE:?not set: run through azd}"

infra_dir=$(cd "$(dirname "$0")/.." && pwd)
attempts=${POSTDEPLOY_KEY_ATTEMPTS:-30}
delay=${POSTDEPLOY_KEY_DELAY_SECONDS:-10}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
chmod 700 "$work"

echo "postdeploy: waiting for the blobs_extension system key of $AZURE_FUNCTION_APP_NAME"
key=""
n=0
while :; do
    n=$((n + 1))
    # Listing keys also wakes the host, which creates the key when it loads the blob extension.
    key=$(az functionapp keys list --subscription "$AZURE_SUBSCRIPTION_ID" --resource-group "$AZURE_RESOURCE_GROUP" \
        --name "$AZURE_FUNCTION_APP_NAME" --query "systemKeys.blobs_extension" --output tsv 2>"$work/err" || true)
    if [ -n "$key" ] && [ "$key" != "None" ]; then
        break
    fi
    if [ "$n" -ge "$attempts" ]; then
        echo "postdeploy: no blobs_extension key after $attempts tries." >&2
        if [ -s "$work/err" ]; then
            # An az error (sign-in, wrong subscription, no access) is the cause, not indexing: show it.
            echo "  last az error:" >&2
            sed 's/^/    /' "$work/err" >&2
        else
            echo "  Is on_video_uploaded indexed? See the functions the host loaded:" >&2
        fi
        echo "  az functionapp function list --subscription $AZURE_SUBSCRIPTION_ID -g $AZURE_RESOURCE_GROUP -n $AZURE_FUNCTION_APP_NAME -o table" >&2
        exit 1
    fi
    sleep "$delay"
done

# The key goes through a parameters file readable by this user only, not the command line.
params="$work/params.json"
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

# The worker image, before the subscription: each new Batch node pulls it as it starts, and without it the
# pool's nodes are unusable (and billed) while the first upload's tasks wait. Built in Azure (no local Docker)
# when the registry lacks it; POSTDEPLOY_BUILD_IMAGE=always builds it again (after changing gpu_worker/).
image=${BATCH_WORKER_IMAGE#*/}
if [ "${POSTDEPLOY_BUILD_IMAGE:-missing}" = always ] || ! az acr repository show --subscription "$AZURE_SUBSCRIPTION_ID" \
        --name "$AZURE_CONTAINER_REGISTRY_NAME" --image "$image" --output none 2>"$work/err"; then
    echo "postdeploy: building $image in $AZURE_CONTAINER_REGISTRY_NAME with ACR Tasks (the first build takes a while)"
    az acr build --subscription "$AZURE_SUBSCRIPTION_ID" --registry "$AZURE_CONTAINER_REGISTRY_NAME" \
        --image "$image" "$infra_dir/../gpu_worker"
fi

echo "postdeploy: creating Event Grid subscription input-blob-created on $EVENTGRID_SYSTEM_TOPIC_NAME"
az deployment group create \
    --subscription "$AZURE_SUBSCRIPTION_ID" \
    --resource-group "$AZURE_RESOURCE_GROUP" \
    --name "eventgrid-input-blob-created" \
    --template-file "$infra_dir/eventgrid.bicep" \
    --parameters "@$params" \
    --output none
echo "postdeploy: done; new blobs in the input container now start stylize_video"
