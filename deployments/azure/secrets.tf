resource "random_password" "postgres" {
  length  = 32
  special = false
}
