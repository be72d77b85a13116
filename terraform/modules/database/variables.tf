variable "project_id" {
  type        = string
  description = "Google Cloud project of the instance."
}

variable "region" {
  type        = string
  description = "Region of the instance (the cluster's region)."
}

variable "name" {
  type        = string
  description = "Cloud SQL instance name."
}

variable "network_id" {
  type        = string
  description = "VPC the instance gets its private IP in (cluster module output `network_id`)."
}

variable "database_version" {
  type        = string
  description = "PostgreSQL major version."
  default     = "POSTGRES_18"
}

variable "tier" {
  type        = string
  description = "Machine tier. MLflow's tracking load is small; db-custom-1-3840 is 1 vCPU, 3.75 GB."
  default     = "db-custom-1-3840"
}

variable "availability_type" {
  type        = string
  description = "ZONAL, or REGIONAL for a standby in a second zone."
  default     = "ZONAL"
  validation {
    condition     = contains(["ZONAL", "REGIONAL"], var.availability_type)
    error_message = "availability_type must be ZONAL or REGIONAL."
  }
}

variable "disk_size_gb" {
  type        = number
  description = "Initial disk size; it grows automatically."
  default     = 20
}

variable "db_user" {
  type        = string
  description = "Built-in PostgreSQL user MLflow connects as (through the Cloud SQL Auth Proxy, password from the `mlflow-db` Secret)."
  default     = "mlflow"
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse to delete the instance (terraform and API) while true."
  default     = true
}

variable "labels" {
  type        = map(string)
  description = "User labels of the instance."
  default     = {}
}
