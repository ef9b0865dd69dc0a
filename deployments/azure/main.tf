# Global parts (one of each): resource group, the managed identity of the pods (workload
# identity), Key Vault with the connection strings, the results storage account (GZRS), the
# container registry, and Front Door for DNS failover. Each region (modules/region) has its own
# AKS, Redis, API Management and PostgreSQL (primary with HA in one, a geo-replica in the other).

resource "random_string" "suffix" {
  length  = 5
  upper   = false
  special = false
}

locals {
  name = "${var.prefix}${random_string.suffix.result}"
}

resource "azurerm_resource_group" "global" {
  name     = "${var.prefix}-global"
  location = var.primary_location
  tags     = var.tags
}

data "azurerm_client_config" "current" {}

resource "azurerm_user_assigned_identity" "workload" {
  name                = "${var.prefix}-workload"
  resource_group_name = azurerm_resource_group.global.name
  location            = azurerm_resource_group.global.location
  tags                = var.tags
}

resource "azurerm_container_registry" "images" {
  name                = "${local.name}acr"
  resource_group_name = azurerm_resource_group.global.name
  location            = azurerm_resource_group.global.location
  sku                 = "Premium"
  admin_enabled       = false
  # Geo-replicated so that the secondary region pulls images locally, also when the primary is down.
  georeplications {
    location                = var.secondary_location
    zone_redundancy_enabled = true
  }
  zone_redundancy_enabled = true
  tags                    = var.tags
}

module "primary" {
  source = "./modules/region"

  prefix                    = var.prefix
  location                  = var.primary_location
  role                      = "primary"
  address_space             = "10.40.0.0/16"
  kubernetes_version        = var.kubernetes_version
  node_pools                = var.node_pools
  redis_sku                 = var.redis_sku
  postgres_sku              = var.postgres_sku
  postgres_storage_mb       = var.postgres_storage_mb
  postgres_admin_login      = var.postgres_admin_login
  postgres_admin_password   = random_password.postgres.result
  postgres_source_server_id = null
  apim_sku                  = var.apim_sku
  apim_publisher_email      = var.apim_publisher_email
  api_rate_limit_per_minute = var.api_rate_limit_per_minute
  container_registry_id     = azurerm_container_registry.images.id
  workload_principal_id     = azurerm_user_assigned_identity.workload.principal_id
  tags                      = var.tags
}

module "secondary" {
  source = "./modules/region"

  prefix                    = var.prefix
  location                  = var.secondary_location
  role                      = "secondary"
  address_space             = "10.41.0.0/16"
  kubernetes_version        = var.kubernetes_version
  node_pools                = var.node_pools
  redis_sku                 = var.redis_sku
  postgres_sku              = var.postgres_sku
  postgres_storage_mb       = var.postgres_storage_mb
  postgres_admin_login      = var.postgres_admin_login
  postgres_admin_password   = random_password.postgres.result
  postgres_source_server_id = module.primary.postgres_server_id
  apim_sku                  = var.apim_sku
  apim_publisher_email      = var.apim_publisher_email
  api_rate_limit_per_minute = var.api_rate_limit_per_minute
  container_registry_id     = azurerm_container_registry.images.id
  workload_principal_id     = azurerm_user_assigned_identity.workload.principal_id
  tags                      = var.tags
}

# Each region's AKS OIDC issuer may hand the pods' service accounts a token of the workload identity.
resource "azurerm_federated_identity_credential" "pods" {
  for_each = {
    for pair in setproduct(["primary", "secondary"], ["prefect-server", "prefect-worker", "irefine-flow"]) :
    "${pair[0]}-${pair[1]}" => { region = pair[0], account = pair[1] }
  }
  name                = each.key
  resource_group_name = azurerm_resource_group.global.name
  parent_id           = azurerm_user_assigned_identity.workload.id
  audience            = ["api://AzureADTokenExchange"]
  issuer              = each.value.region == "primary" ? module.primary.oidc_issuer_url : module.secondary.oidc_issuer_url
  subject             = "system:serviceaccount:irefine:${each.value.account}"
}
