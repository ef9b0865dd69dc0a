# The Iterative Refinement Engine on Azure, in two regions (docs/aks.md is the runbook).
# `terraform validate` needs the azurerm provider, which `terraform init` downloads; the test suite
# (tests/test_aks.py) can only check formatting and parse every file offline.
terraform {
  required_version = ">= 1.9.0"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.40"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}

provider "azurerm" {
  features {
    key_vault {
      purge_soft_delete_on_destroy = false
    }
    resource_group {
      prevent_deletion_if_contains_resources = true
    }
  }
}
