# Azure Database for PostgreSQL flexible server: the Prefect database and the job store.
# Primary region: zone-redundant HA (synchronous standby in another zone, automatic failover) and
# an in-region read replica for the job store's lag-tolerant reads (IRE_DATABASE_REPLICA_URL).
# Secondary region: an asynchronous geo-replica of the primary, promoted on region failover.
resource "azurerm_postgresql_flexible_server" "region" {
  name                          = "${local.name}-pg"
  resource_group_name           = azurerm_resource_group.region.name
  location                      = var.location
  version                       = "16"
  sku_name                      = var.postgres_sku
  storage_mb                    = var.postgres_storage_mb
  auto_grow_enabled             = true
  zone                          = "1"
  delegated_subnet_id           = azurerm_subnet.postgres.id
  private_dns_zone_id           = azurerm_private_dns_zone.postgres.id
  public_network_access_enabled = false
  create_mode                   = var.postgres_source_server_id == null ? "Default" : "Replica"
  source_server_id              = var.postgres_source_server_id
  administrator_login           = var.postgres_source_server_id == null ? var.postgres_admin_login : null
  administrator_password        = var.postgres_source_server_id == null ? var.postgres_admin_password : null
  backup_retention_days         = 14
  geo_redundant_backup_enabled  = true

  dynamic "high_availability" {
    for_each = var.postgres_source_server_id == null ? [1] : []
    content {
      mode                      = "ZoneRedundant"
      standby_availability_zone = "2"
    }
  }

  tags = var.tags

  depends_on = [azurerm_private_dns_zone_virtual_network_link.postgres]

  lifecycle {
    # Azure moves the primary between zones on an HA failover.
    ignore_changes = [zone, high_availability[0].standby_availability_zone]
  }
}

resource "azurerm_postgresql_flexible_server" "read_replica" {
  count = var.postgres_source_server_id == null ? 1 : 0

  name                          = "${local.name}-pg-read"
  resource_group_name           = azurerm_resource_group.region.name
  location                      = var.location
  version                       = "16"
  sku_name                      = var.postgres_sku
  storage_mb                    = var.postgres_storage_mb
  auto_grow_enabled             = true
  zone                          = "3"
  delegated_subnet_id           = azurerm_subnet.postgres.id
  private_dns_zone_id           = azurerm_private_dns_zone.postgres.id
  public_network_access_enabled = false
  create_mode                   = "Replica"
  source_server_id              = azurerm_postgresql_flexible_server.region.id
  tags                          = var.tags
}

resource "azurerm_postgresql_flexible_server_database" "databases" {
  for_each = var.postgres_source_server_id == null ? toset(["prefect", "irefine"]) : toset([])

  name      = each.key
  server_id = azurerm_postgresql_flexible_server.region.id
  charset   = "UTF8"
  collation = "en_US.utf8"
}

# prefect-redis' Docket and Prefect's migrations need these extensions allowed.
resource "azurerm_postgresql_flexible_server_configuration" "extensions" {
  count = var.postgres_source_server_id == null ? 1 : 0

  name      = "azure.extensions"
  server_id = azurerm_postgresql_flexible_server.region.id
  value     = "PG_TRGM"
}

locals {
  postgres_host = azurerm_postgresql_flexible_server.region.fqdn
  postgres_read_host = (
    var.postgres_source_server_id == null ? azurerm_postgresql_flexible_server.read_replica[0].fqdn : local.postgres_host
  )
  postgres_credentials = "${var.postgres_admin_login}:${var.postgres_admin_password}"
}
