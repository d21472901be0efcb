// The job telemetry workbook (per-job timeline, slowest segments, fps by node and GPU, failures by reason)
// and a scheduled-query alert on failed jobs, both on the Application Insights component that
// pipeline/telemetry/ sends to. The workbook JSON is built from the .kql files next to this file
// (build_workbook.py); the alert's query is failed-jobs-alert.kql. See docs/telemetry.md.

param location string
param tags object = {}

@description('Name of the existing Application Insights component (monitoring.bicep).')
param appInsightsName string

@description('Display name of the workbook in Application Insights → Workbooks.')
param workbookDisplayName string = 'Video stylize jobs'

@description('Alert on jobs that failed because of bad input (a bad upload) too, not only on internal failures.')
param alertOnInputErrors bool = true

@description('Email address that the failed-jobs alert notifies; empty = no action group (the alert shows in the portal only).')
param alertEmail string = ''

@description('Further action group resource ids for the failed-jobs alert.')
param actionGroupIds array = []

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appInsightsName, 'stylize-jobs-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: workbookDisplayName
    category: 'workbook'
    version: 'Notebook/1.0'
    sourceId: appInsights.id
    serializedData: loadTextContent('stylize.workbook.json')
  }
}

resource emailGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-stylize-failed-jobs'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'stylizefail'
    enabled: true
    emailReceivers: [
      {
        name: 'failed-jobs-email'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var failedJobsQuery = loadTextContent('failed-jobs-alert.kql')
var alertQuery = alertOnInputErrors ? failedJobsQuery : '${failedJobsQuery}| where kind != "input"\n'

resource failedJobsAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-stylize-failed-jobs'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Video stylize: jobs failed'
    description: 'One or more stylize jobs failed (JobFailed events from pipeline/telemetry/). The alert is split by kind: input (bad input the uploader can fix) or internal. Open the Video stylize jobs workbook, Failures by reason.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: alertQuery
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'kind'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: concat(empty(alertEmail) ? [] : [emailGroup.id], actionGroupIds)
    }
  }
}

output workbookId string = workbook.id
output failedJobsAlertId string = failedJobsAlert.id
