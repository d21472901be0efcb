# azd postdeploy hook (Windows; infra/hooks/postdeploy.sh is the Linux/macOS twin, keep them in step):
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
#
# Runs in PowerShell 7 (pwsh) and in Windows PowerShell 5.1, which azd falls back to without pwsh.

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3.0

function Get-AzdValue([string] $Name) {
    $value = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrEmpty($value)) {
        throw "${Name} not set: run through azd (azd up / azd deploy) or set the azd env values"
    }
    return $value
}

$subscription = Get-AzdValue 'AZURE_SUBSCRIPTION_ID'
$resourceGroup = Get-AzdValue 'AZURE_RESOURCE_GROUP'
$appName = Get-AzdValue 'AZURE_FUNCTION_APP_NAME'
$appHostName = Get-AzdValue 'AZURE_FUNCTION_APP_HOSTNAME'
$topicName = Get-AzdValue 'EVENTGRID_SYSTEM_TOPIC_NAME'
$registry = Get-AzdValue 'AZURE_CONTAINER_REGISTRY_NAME'
$workerImage = Get-AzdValue 'BATCH_WORKER_IMAGE'

$infraDir = Split-Path -Parent $PSScriptRoot
$attempts = if ($env:POSTDEPLOY_KEY_ATTEMPTS) { [int] $env:POSTDEPLOY_KEY_ATTEMPTS } else { 30 }
$delay = if ($env:POSTDEPLOY_KEY_DELAY_SECONDS) { [int] $env:POSTDEPLOY_KEY_DELAY_SECONDS } else { 10 }

# A folder of this user's own (under the user's temp directory) for az's stderr and the parameters file.
$work = Join-Path ([IO.Path]::GetTempPath()) ("postdeploy-" + [Guid]::NewGuid().ToString('N'))
New-Item -ItemType Directory -Path $work | Out-Null
$errFile = Join-Path $work 'err.txt'
$params = Join-Path $work 'params.json'

try {
    Write-Host "postdeploy: waiting for the blobs_extension system key of $appName"
    $key = ''
    $n = 0
    while ($true) {
        $n++
        # Listing keys also wakes the host, which creates the key when it loads the blob extension.
        # az is a native command: its failures show in $LASTEXITCODE and its stderr goes to a file, so that
        # neither PowerShell 5.1 nor 7 turns a transient error into a terminating one.
        $ErrorActionPreference = 'Continue'
        $key = az functionapp keys list --subscription $subscription --resource-group $resourceGroup `
            --name $appName --query 'systemKeys.blobs_extension' --output tsv 2> $errFile
        $ErrorActionPreference = 'Stop'
        $key = "$key".Trim()
        if ($key -and $key -ne 'None') {
            break
        }
        if ($n -ge $attempts) {
            Write-Host "postdeploy: no blobs_extension key after $attempts tries."
            $lastError = if (Test-Path $errFile) { (Get-Content -Raw $errFile) } else { $null }
            if ($lastError) {
                # An az error (sign-in, wrong subscription, no access) is the cause, not indexing: show it.
                Write-Host "  last az error:"
                Write-Host $lastError
            } else {
                Write-Host "  Is on_video_uploaded indexed? See the functions the host loaded:"
            }
            Write-Host "  az functionapp function list --subscription $subscription -g $resourceGroup -n $appName -o table"
            # A terminating error (not `exit`) so that `finally` removes the work folder; azd sees exit code 1.
            throw "postdeploy: gave up waiting for the blobs_extension key"
        }
        Start-Sleep -Seconds $delay
    }

    # The key goes through a parameters file in this user's temp folder, not the command line.
    $document = [ordered] @{
        '$schema'      = 'https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#'
        contentVersion = '1.0.0.0'
        parameters     = [ordered] @{
            systemTopicName     = @{ value = $topicName }
            functionAppHostName = @{ value = $appHostName }
            blobsExtensionKey   = @{ value = $key }
        }
    }
    # UTF-8 without a byte order mark in both PowerShell versions (their Out-File defaults differ).
    [IO.File]::WriteAllText($params, ($document | ConvertTo-Json -Depth 5), (New-Object Text.UTF8Encoding $false))

    # The worker image, before the subscription: each new Batch node pulls it as it starts, and without it the
    # pool's nodes are unusable (and billed) while the first upload's tasks wait. Built in Azure (no local
    # Docker) when the registry lacks it; POSTDEPLOY_BUILD_IMAGE=always builds it again.
    $image = $workerImage.Substring($workerImage.IndexOf('/') + 1)
    $build = $env:POSTDEPLOY_BUILD_IMAGE -eq 'always'
    if (-not $build) {
        $ErrorActionPreference = 'Continue'
        az acr repository show --subscription $subscription --name $registry --image $image --output none 2> $errFile
        $ErrorActionPreference = 'Stop'
        $build = $LASTEXITCODE -ne 0
    }
    if ($build) {
        Write-Host "postdeploy: building $image in $registry with ACR Tasks (the first build takes a while)"
        $ErrorActionPreference = 'Continue'
        az acr build --subscription $subscription --registry $registry --image $image `
            (Join-Path (Split-Path -Parent $infraDir) 'gpu_worker')
        $ErrorActionPreference = 'Stop'
        if ($LASTEXITCODE -ne 0) {
            throw "building the worker image failed (exit code $LASTEXITCODE)"
        }
    }

    Write-Host "postdeploy: creating Event Grid subscription input-blob-created on $topicName"
    $ErrorActionPreference = 'Continue'
    az deployment group create `
        --subscription $subscription `
        --resource-group $resourceGroup `
        --name 'eventgrid-input-blob-created' `
        --template-file (Join-Path $infraDir 'eventgrid.bicep') `
        --parameters "@$params" `
        --output none
    $ErrorActionPreference = 'Stop'
    if ($LASTEXITCODE -ne 0) {
        throw "deploying eventgrid.bicep failed (exit code $LASTEXITCODE)"
    }
    Write-Host 'postdeploy: done; new blobs in the input container now start stylize_video'
}
finally {
    Remove-Item -Recurse -Force -ErrorAction SilentlyContinue $work
}
