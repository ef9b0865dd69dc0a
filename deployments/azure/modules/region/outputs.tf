output "location" {
  description = "Azure region."
  value       = var.location
}

output "resource_group_name" {
  description = "Resource group of the region."
  value       = azurerm_resource_group.region.name
}

output "aks_cluster_name" {
  description = "AKS cluster (az aks get-credentials)."
  value       = azurerm_kubernetes_cluster.region.name
}

output "oidc_issuer_url" {
  description = "OIDC issuer of the cluster, for workload identity."
  value       = azurerm_kubernetes_cluster.region.oidc_issuer_url
}

output "key_vault_name" {
  description = "Key Vault with the connection strings (the SecretProviderClass's keyvaultName)."
  value       = azurerm_key_vault.region.name
}

output "api_internal_ip" {
  description = "Address of the Prefect API's internal load balancer (the aks overlay's annotation)."
  value       = local.api_internal_ip
}

output "apim_gateway_host" {
  description = "Host name of the region's API Management gateway (Front Door's origin)."
  value       = trimprefix(azurerm_api_management.region.gateway_url, "https://")
}

output "postgres_server_id" {
  description = "PostgreSQL server id (the secondary region replicates the primary's)."
  value       = azurerm_postgresql_flexible_server.region.id
}
