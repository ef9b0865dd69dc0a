# DNS-level failover between the regions: Front Door sends every request to the primary region's
# API Management while its /api/health answers, else to the secondary (priority 2).
resource "azurerm_cdn_frontdoor_profile" "api" {
  name                     = "${var.prefix}-frontdoor"
  resource_group_name      = azurerm_resource_group.global.name
  sku_name                 = "Standard_AzureFrontDoor"
  response_timeout_seconds = 120
  tags                     = var.tags
}

resource "azurerm_cdn_frontdoor_endpoint" "api" {
  name                     = "${local.name}-api"
  cdn_frontdoor_profile_id = azurerm_cdn_frontdoor_profile.api.id
  tags                     = var.tags
}

resource "azurerm_cdn_frontdoor_origin_group" "api" {
  name                     = "prefect-api"
  cdn_frontdoor_profile_id = azurerm_cdn_frontdoor_profile.api.id
  session_affinity_enabled = true

  health_probe {
    protocol            = "Https"
    path                = "/api/health"
    request_type        = "GET"
    interval_in_seconds = 30
  }

  load_balancing {
    sample_size                        = 4
    successful_samples_required        = 2
    additional_latency_in_milliseconds = 0
  }

  restore_traffic_time_to_healed_or_new_endpoint_in_minutes = 10
}

resource "azurerm_cdn_frontdoor_origin" "region" {
  for_each = {
    primary   = { host = module.primary.apim_gateway_host, priority = 1 }
    secondary = { host = module.secondary.apim_gateway_host, priority = 2 }
  }
  name                           = each.key
  cdn_frontdoor_origin_group_id  = azurerm_cdn_frontdoor_origin_group.api.id
  enabled                        = true
  host_name                      = each.value.host
  origin_host_header             = each.value.host
  http_port                      = 80
  https_port                     = 443
  priority                       = each.value.priority
  weight                         = 1000
  certificate_name_check_enabled = true
}

resource "azurerm_cdn_frontdoor_route" "api" {
  name                          = "prefect-api"
  cdn_frontdoor_endpoint_id     = azurerm_cdn_frontdoor_endpoint.api.id
  cdn_frontdoor_origin_group_id = azurerm_cdn_frontdoor_origin_group.api.id
  cdn_frontdoor_origin_ids      = [for origin in azurerm_cdn_frontdoor_origin.region : origin.id]
  supported_protocols           = ["Https"]
  patterns_to_match             = ["/api/*"]
  forwarding_protocol           = "HttpsOnly"
  https_redirect_enabled        = false
  link_to_default_domain        = true
}
