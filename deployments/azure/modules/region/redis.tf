# Azure Managed Redis (Redis 7.4): Prefect's messaging, causal ordering, leases and Docket, and the
# engine's inference cache. Not Azure Cache for Redis: it runs Redis 6.0, which lacks XAUTOCLAIM,
# the command prefect-redis' stream consumers use to take over a dead consumer's messages.
# TLS only (port 10000). One database (db 0): the engine separates its keys by IRE_CACHE_NAMESPACE.
# Zone-redundant with high availability; each region has its own (messages in flight are the
# region's own; a failover starts with an empty broker, which Prefect tolerates).
resource "azurerm_managed_redis" "region" {
  name                      = "${local.name}-redis"
  resource_group_name       = azurerm_resource_group.region.name
  location                  = var.location
  sku_name                  = var.redis_sku
  high_availability_enabled = true
  public_network_access     = "Disabled"

  default_database {
    access_keys_authentication_enabled = true
    client_protocol                    = "Encrypted"
    clustering_policy                  = "EnterpriseCluster" # one endpoint: prefect-redis is no cluster client
    eviction_policy                    = "NoEviction"        # leases and streams must never be evicted

    persistence_append_only_file_backup_frequency = "1s"
  }

  tags = var.tags
}

resource "azurerm_private_endpoint" "redis" {
  name                = "${local.name}-redis-pe"
  resource_group_name = azurerm_resource_group.region.name
  location            = var.location
  subnet_id           = azurerm_subnet.endpoints.id

  private_service_connection {
    name                           = "redis"
    private_connection_resource_id = azurerm_managed_redis.region.id
    subresource_names              = ["redisEnterprise"]
    is_manual_connection           = false
  }

  private_dns_zone_group {
    name                 = "redis"
    private_dns_zone_ids = [azurerm_private_dns_zone.redis.id]
  }

  tags = var.tags
}

locals {
  redis_url = format(
    "rediss://:%s@%s:10000/0",
    azurerm_managed_redis.region.default_database[0].primary_access_key,
    azurerm_managed_redis.region.hostname,
  )
}
