# Prefect's persisted results (the AzureBlobStorageContainer block irefine-results, docs/aks.md):
# geo-zone-redundant, readable in the secondary region (RA-GZRS) while the primary is down.
resource "azurerm_storage_account" "results" {
  name                             = "${local.name}results"
  resource_group_name              = azurerm_resource_group.global.name
  location                         = var.primary_location
  account_tier                     = "Standard"
  account_replication_type         = "RAGZRS"
  account_kind                     = "StorageV2"
  min_tls_version                  = "TLS1_2"
  https_traffic_only_enabled       = true
  allow_nested_items_to_be_public  = false
  shared_access_key_enabled        = false # pods use the workload identity, not account keys
  cross_tenant_replication_enabled = false
  blob_properties {
    versioning_enabled = true
    delete_retention_policy {
      days = 14
    }
    container_delete_retention_policy {
      days = 14
    }
  }
  tags = var.tags
}

resource "azurerm_storage_container" "results" {
  name                  = "prefect-results"
  storage_account_id    = azurerm_storage_account.results.id
  container_access_type = "private"
}

resource "azurerm_role_assignment" "results_writer" {
  scope                = azurerm_storage_account.results.id
  role_definition_name = "Storage Blob Data Contributor"
  principal_id         = azurerm_user_assigned_identity.workload.principal_id
}
