locals {
  name  = "${var.prefix}-${var.location}"
  zones = ["1", "2", "3"]
  # The Prefect API's internal load balancer takes this fixed address of the node subnet (the aks
  # overlay's Service annotation), so API Management knows its backend before the cluster exists.
  api_internal_ip = cidrhost(azurerm_subnet.aks.address_prefixes[0], 4090)
}

resource "azurerm_resource_group" "region" {
  name     = "${local.name}-rg"
  location = var.location
  tags     = var.tags
}

resource "azurerm_virtual_network" "region" {
  name                = "${local.name}-vnet"
  resource_group_name = azurerm_resource_group.region.name
  location            = var.location
  address_space       = [var.address_space]
  tags                = var.tags
}

resource "azurerm_subnet" "aks" {
  name                 = "aks-nodes"
  resource_group_name  = azurerm_resource_group.region.name
  virtual_network_name = azurerm_virtual_network.region.name
  address_prefixes     = [cidrsubnet(var.address_space, 4, 0)]
}

resource "azurerm_subnet" "postgres" {
  name                 = "postgres"
  resource_group_name  = azurerm_resource_group.region.name
  virtual_network_name = azurerm_virtual_network.region.name
  address_prefixes     = [cidrsubnet(var.address_space, 8, 16)]
  delegation {
    name = "postgres-flexible"
    service_delegation {
      name    = "Microsoft.DBforPostgreSQL/flexibleServers"
      actions = ["Microsoft.Network/virtualNetworks/subnets/join/action"]
    }
  }
}

resource "azurerm_subnet" "apim" {
  name                 = "apim"
  resource_group_name  = azurerm_resource_group.region.name
  virtual_network_name = azurerm_virtual_network.region.name
  address_prefixes     = [cidrsubnet(var.address_space, 8, 17)]
}

resource "azurerm_subnet" "endpoints" {
  name                 = "private-endpoints"
  resource_group_name  = azurerm_resource_group.region.name
  virtual_network_name = azurerm_virtual_network.region.name
  address_prefixes     = [cidrsubnet(var.address_space, 8, 18)]
}

resource "azurerm_private_dns_zone" "postgres" {
  name                = "${var.prefix}-${var.location}.private.postgres.database.azure.com"
  resource_group_name = azurerm_resource_group.region.name
  tags                = var.tags
}

resource "azurerm_private_dns_zone_virtual_network_link" "postgres" {
  name                  = "postgres"
  resource_group_name   = azurerm_resource_group.region.name
  private_dns_zone_name = azurerm_private_dns_zone.postgres.name
  virtual_network_id    = azurerm_virtual_network.region.id
}

resource "azurerm_private_dns_zone" "redis" {
  name                = "privatelink.redis.azure.net"
  resource_group_name = azurerm_resource_group.region.name
  tags                = var.tags
}

resource "azurerm_private_dns_zone_virtual_network_link" "redis" {
  name                  = "redis"
  resource_group_name   = azurerm_resource_group.region.name
  private_dns_zone_name = azurerm_private_dns_zone.redis.name
  virtual_network_id    = azurerm_virtual_network.region.id
}
