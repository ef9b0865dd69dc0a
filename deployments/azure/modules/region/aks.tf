# AKS across zones 1-3. The cluster autoscaler runs on every pool between its bounds: it adds
# nodes when pods are Pending for lack of CPU or memory (flow-run Jobs, Dask workers the operator's
# autoscaler asked for) and removes nodes idle for 10 minutes. Pools carry irefine/profile.
resource "azurerm_kubernetes_cluster" "region" {
  name                      = "${local.name}-aks"
  resource_group_name       = azurerm_resource_group.region.name
  location                  = var.location
  dns_prefix                = "${var.prefix}-${var.role}"
  kubernetes_version        = var.kubernetes_version
  sku_tier                  = "Standard" # uptime SLA for the control plane
  automatic_upgrade_channel = "patch"
  node_os_upgrade_channel   = "NodeImage"
  oidc_issuer_enabled       = true
  workload_identity_enabled = true
  azure_policy_enabled      = true

  default_node_pool {
    name                         = "system"
    vm_size                      = var.node_pools["system"].vm_size
    zones                        = local.zones
    auto_scaling_enabled         = true
    min_count                    = var.node_pools["system"].min_count
    max_count                    = var.node_pools["system"].max_count
    vnet_subnet_id               = azurerm_subnet.aks.id
    only_critical_addons_enabled = false
    max_pods                     = 60
    node_labels = {
      "irefine/profile" = "system"
    }
    upgrade_settings {
      max_surge                     = "33%"
      drain_timeout_in_minutes      = 30
      node_soak_duration_in_minutes = 0
    }
  }

  identity {
    type = "SystemAssigned"
  }

  network_profile {
    network_plugin      = "azure"
    network_plugin_mode = "overlay"
    network_policy      = "cilium"
    network_data_plane  = "cilium"
    load_balancer_sku   = "standard"
  }

  auto_scaler_profile {
    balance_similar_node_groups      = true # keeps the zones of a pool even
    expander                         = "least-waste"
    scale_down_unneeded              = "10m"
    scale_down_delay_after_add       = "10m"
    max_graceful_termination_sec     = 600
    skip_nodes_with_local_storage    = false
    scan_interval                    = "10s"
    new_pod_scale_up_delay           = "0s"
    scale_down_utilization_threshold = 0.5
  }

  key_vault_secrets_provider {
    secret_rotation_enabled  = true
    secret_rotation_interval = "2m"
  }

  maintenance_window_auto_upgrade {
    frequency   = "Weekly"
    interval    = 1
    duration    = 4
    day_of_week = "Sunday"
    start_time  = "02:00"
    utc_offset  = "+00:00"
  }

  tags = var.tags
}

resource "azurerm_kubernetes_cluster_node_pool" "profile" {
  for_each = { for name, pool in var.node_pools : name => pool if name != "system" }

  name                  = each.key
  kubernetes_cluster_id = azurerm_kubernetes_cluster.region.id
  vm_size               = each.value.vm_size
  zones                 = local.zones
  auto_scaling_enabled  = true
  min_count             = each.value.min_count
  max_count             = each.value.max_count
  vnet_subnet_id        = azurerm_subnet.aks.id
  mode                  = "User"
  node_labels = {
    "irefine/profile" = each.key
  }
  upgrade_settings {
    max_surge                     = "33%"
    drain_timeout_in_minutes      = 30
    node_soak_duration_in_minutes = 0
  }
  tags = var.tags
}

resource "azurerm_role_assignment" "aks_pulls_images" {
  scope                            = var.container_registry_id
  role_definition_name             = "AcrPull"
  principal_id                     = azurerm_kubernetes_cluster.region.kubelet_identity[0].object_id
  skip_service_principal_aad_check = true
}

# The cluster's identity manages the API's internal load balancer in the node subnet.
resource "azurerm_role_assignment" "aks_network" {
  scope                = azurerm_virtual_network.region.id
  role_definition_name = "Network Contributor"
  principal_id         = azurerm_kubernetes_cluster.region.identity[0].principal_id
}
