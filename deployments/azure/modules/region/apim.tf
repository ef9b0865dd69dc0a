# API Management in front of the Prefect API: the public entry (Front Door's origin), with a
# per-client rate limit, zone-redundant in Premium, reaching the API's internal load balancer
# through the virtual network.
resource "azurerm_public_ip" "apim" {
  name                = "${local.name}-apim-ip"
  resource_group_name = azurerm_resource_group.region.name
  location            = var.location
  allocation_method   = "Static"
  sku                 = "Standard"
  zones               = local.zones
  domain_name_label   = "${var.prefix}-${var.role}-apim"
  tags                = var.tags
}

resource "azurerm_api_management" "region" {
  name                 = "${local.name}-apim"
  resource_group_name  = azurerm_resource_group.region.name
  location             = var.location
  publisher_name       = "Iterative Refinement Engine"
  publisher_email      = var.apim_publisher_email
  sku_name             = var.apim_sku
  zones                = startswith(var.apim_sku, "Premium") ? local.zones : null
  public_ip_address_id = azurerm_public_ip.apim.id
  virtual_network_type = "External"

  virtual_network_configuration {
    subnet_id = azurerm_subnet.apim.id
  }

  tags = var.tags
}

resource "azurerm_api_management_api" "prefect" {
  name                  = "prefect"
  resource_group_name   = azurerm_resource_group.region.name
  api_management_name   = azurerm_api_management.region.name
  revision              = "1"
  display_name          = "Prefect API"
  path                  = "api"
  protocols             = ["https"]
  service_url           = "http://${local.api_internal_ip}:4200/api"
  subscription_required = false
}

# Every path and method of the Prefect API, passed through (it has hundreds of operations).
resource "azurerm_api_management_api_operation" "all" {
  for_each = toset(["GET", "POST", "PUT", "PATCH", "DELETE"])

  operation_id        = "all-${lower(each.key)}"
  api_name            = azurerm_api_management_api.prefect.name
  api_management_name = azurerm_api_management.region.name
  resource_group_name = azurerm_resource_group.region.name
  display_name        = "${each.key} /*"
  method              = each.key
  url_template        = "/*"
}

resource "azurerm_api_management_api_policy" "prefect" {
  api_name            = azurerm_api_management_api.prefect.name
  api_management_name = azurerm_api_management.region.name
  resource_group_name = azurerm_resource_group.region.name

  # A client over the limit gets 429, which Prefect's client retries with back-off.
  xml_content = <<-XML
    <policies>
      <inbound>
        <base />
        <rate-limit-by-key calls="${var.api_rate_limit_per_minute}" renewal-period="60"
                           counter-key="@(context.Request.IpAddress)" />
      </inbound>
      <backend>
        <forward-request timeout="120" />
      </backend>
      <outbound>
        <base />
      </outbound>
      <on-error>
        <base />
      </on-error>
    </policies>
  XML
}
