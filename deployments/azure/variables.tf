variable "prefix" {
  description = "Short lowercase name prefix of every resource (letters and digits, 3-12 characters)."
  type        = string
  default     = "irefine"
  validation {
    condition     = can(regex("^[a-z][a-z0-9]{2,11}$", var.prefix))
    error_message = "prefix must be 3-12 lowercase letters or digits, starting with a letter."
  }
}

variable "primary_location" {
  description = "Azure region that serves traffic; it must have availability zones 1-3."
  type        = string
  default     = "westeurope"
}

variable "secondary_location" {
  description = "Paired region for failover: a standby AKS, the PostgreSQL geo-replica, the storage secondary."
  type        = string
  default     = "northeurope"
}

variable "kubernetes_version" {
  description = "AKS Kubernetes version (the manifests are validated against 1.34)."
  type        = string
  default     = "1.34"
}

variable "node_pools" {
  description = "Node pools per profile: VM size and cluster-autoscaler bounds; label irefine/profile=<name>."
  type = map(object({
    vm_size   = string
    min_count = number
    max_count = number
  }))
  default = {
    system = { vm_size = "Standard_D4ds_v5", min_count = 3, max_count = 6 }
    small  = { vm_size = "Standard_D4ds_v5", min_count = 0, max_count = 20 }
    large  = { vm_size = "Standard_D8ds_v5", min_count = 0, max_count = 10 }
  }
  validation {
    condition     = alltrue([for name in ["system", "small", "large"] : contains(keys(var.node_pools), name)])
    error_message = "node_pools needs the profiles system, small and large."
  }
}

variable "redis_sku" {
  description = "Azure Managed Redis SKU (Redis 7.4; Azure Cache for Redis runs 6.0, which lacks XAUTOCLAIM)."
  type        = string
  default     = "Balanced_B5"
}

variable "postgres_sku" {
  description = "PostgreSQL flexible server SKU (General Purpose: zone-redundant HA needs it)."
  type        = string
  default     = "GP_Standard_D4ds_v5"
}

variable "postgres_storage_mb" {
  description = "PostgreSQL storage in MB."
  type        = number
  default     = 131072
}

variable "postgres_admin_login" {
  description = "PostgreSQL administrator login; its password is generated and kept in Key Vault."
  type        = string
  default     = "irefineadmin"
}

variable "apim_sku" {
  description = "API Management SKU in front of the Prefect API (Developer_1 for trials, Premium_1 for an SLA)."
  type        = string
  default     = "Premium_1"
}

variable "apim_publisher_email" {
  description = "Publisher e-mail of API Management."
  type        = string
}

variable "api_rate_limit_per_minute" {
  description = "Calls per minute that one client IP may make to the Prefect API through API Management."
  type        = number
  default     = 1200
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = { app = "iterative-refinement-engine" }
}
