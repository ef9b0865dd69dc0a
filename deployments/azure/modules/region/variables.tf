variable "prefix" {
  description = "Name prefix of the region's resources."
  type        = string
}

variable "location" {
  description = "Azure region, with availability zones 1-3."
  type        = string
}

variable "role" {
  description = "primary (serves traffic, PostgreSQL primary) or secondary (standby, PostgreSQL geo-replica)."
  type        = string
  validation {
    condition     = contains(["primary", "secondary"], var.role)
    error_message = "role must be primary or secondary."
  }
}

variable "address_space" {
  description = "Address space of the region's virtual network (a /16)."
  type        = string
}

variable "kubernetes_version" {
  description = "AKS Kubernetes version."
  type        = string
}

variable "node_pools" {
  description = "VM size and autoscaler bounds per profile (system, small, large)."
  type = map(object({
    vm_size   = string
    min_count = number
    max_count = number
  }))
}

variable "redis_sku" {
  description = "Azure Managed Redis SKU."
  type        = string
}

variable "postgres_sku" {
  description = "PostgreSQL flexible server SKU."
  type        = string
}

variable "postgres_storage_mb" {
  description = "PostgreSQL storage in MB."
  type        = number
}

variable "postgres_admin_login" {
  description = "PostgreSQL administrator login."
  type        = string
}

variable "postgres_admin_password" {
  description = "PostgreSQL administrator password."
  type        = string
  sensitive   = true
}

variable "postgres_source_server_id" {
  description = "Primary server to replicate (secondary region), or null to create the primary."
  type        = string
  default     = null
}

variable "apim_sku" {
  description = "API Management SKU."
  type        = string
}

variable "apim_publisher_email" {
  description = "Publisher e-mail of API Management."
  type        = string
}

variable "api_rate_limit_per_minute" {
  description = "Calls per minute per client IP through API Management."
  type        = number
}

variable "container_registry_id" {
  description = "Registry the cluster pulls the image from."
  type        = string
}

variable "workload_principal_id" {
  description = "Principal of the pods' workload identity (reads Key Vault)."
  type        = string
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
}
