output "prefect_api_url" {
  description = "PREFECT_API_URL for clients outside the cluster (Front Door, then API Management)."
  value       = "https://${azurerm_cdn_frontdoor_endpoint.api.host_name}/api"
}

output "container_registry" {
  description = "Login server of the registry: push the image here (az acr build)."
  value       = azurerm_container_registry.images.login_server
}

output "workload_identity_client_id" {
  description = "Client id for the service-account annotations and the SecretProviderClass (aks overlay)."
  value       = azurerm_user_assigned_identity.workload.client_id
}

output "tenant_id" {
  description = "Tenant id for the SecretProviderClass."
  value       = data.azurerm_client_config.current.tenant_id
}

output "results_account_url" {
  description = "Blob endpoint of the results account (AzureBlobStorageCredentials account_url)."
  value       = azurerm_storage_account.results.primary_blob_endpoint
}

output "results_container" {
  description = "Blob container of Prefect's persisted results."
  value       = azurerm_storage_container.results.name
}

output "regions" {
  description = "Per region: AKS cluster, resource group, Key Vault name and the API's internal load-balancer IP."
  value = {
    for region in [module.primary, module.secondary] : region.location => {
      resource_group  = region.resource_group_name
      aks_cluster     = region.aks_cluster_name
      key_vault       = region.key_vault_name
      api_internal_ip = region.api_internal_ip
    }
  }
}
