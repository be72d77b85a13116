variable "project_id" {
  type        = string
  description = "Google Cloud project of the bucket."
}

variable "location" {
  type        = string
  description = "Bucket location; the cluster's region keeps checkpoint traffic regional and free of egress charges."
}

variable "bucket_name" {
  type        = string
  description = "Globally unique bucket name for pipeline artifacts, MLflow artifacts and training checkpoints."
  validation {
    condition     = can(regex("^[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 lowercase letters, digits, '-', '_' or '.'."
  }
}

variable "checkpoint_retention_days" {
  type        = number
  description = "Days after which objects under checkpoints/ are deleted (finished runs keep their adapter and MLflow artifacts elsewhere)."
  default     = 30
}

variable "noncurrent_version_retention_days" {
  type        = number
  description = "Days a replaced or deleted object version is kept before it is removed."
  default     = 14
}

variable "force_destroy" {
  type        = bool
  description = "Let `terraform destroy` delete a bucket that still holds objects. Keep false outside throw-away projects."
  default     = false
}

variable "labels" {
  type        = map(string)
  description = "Resource labels of the bucket."
  default     = {}
}
