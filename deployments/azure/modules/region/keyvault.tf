# The connection strings, by reference: the aks overlay's SecretProviderClass reads these names
# through the Secrets Store CSI driver with the workload identity. Each region's secrets point at
# its own Redis and PostgreSQL (in the secondary: the geo-replica, writable once promoted).
data "azurerm_client_config" "current" {}

resource "azurerm_key_vault" "region" {
  name                       = substr(replace("${var.prefix}${var.role}${azurerm_resource_group.region.location}kv", "-", ""), 0, 24)
  resource_group_name        = azurerm_resource_group.region.name
  location                   = var.location
  tenant_id                  = data.azurerm_client_config.current.tenant_id
  sku_name                   = "standard"
  rbac_authorization_enabled = true
  purge_protection_enabled   = true
  soft_delete_retention_days = 30
  tags                       = var.tags
}

resource "azurerm_role_assignment" "pods_read_secrets" {
  scope                = azurerm_key_vault.region.id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = var.workload_principal_id
}

resource "azurerm_role_assignment" "terraform_writes_secrets" {
  scope                = azurerm_key_vault.region.id
  role_definition_name = "Key Vault Secrets Officer"
  principal_id         = data.azurerm_client_config.current.object_id
}

locals {
  secrets = {
    "prefect-database-url"     = "postgresql+asyncpg://${local.postgres_credentials}@${local.postgres_host}:5432/prefect?ssl=require"
    "prefect-redis-url"        = local.redis_url
    "ire-database-url"         = "postgresql+psycopg://${local.postgres_credentials}@${local.postgres_host}:5432/irefine?sslmode=require"
    "ire-database-replica-url" = "postgresql+psycopg://${local.postgres_credentials}@${local.postgres_read_host}:5432/irefine?sslmode=require"
    "ire-redis-url"            = local.redis_url
  }
}

resource "azurerm_key_vault_secret" "connection" {
  for_each = local.secrets

  name         = each.key
  value        = each.value
  key_vault_id = azurerm_key_vault.region.id
  content_type = "connection-url"

  depends_on = [azurerm_role_assignment.terraform_writes_secrets]
}
