variable "project_id" {
  type        = string
  description = "Google Cloud project of the repository."
}

variable "location" {
  type        = string
  description = "Repository location; the cluster's region keeps image pulls regional."
}

variable "repository_id" {
  type        = string
  description = "Artifact Registry repository id; images are LOCATION-docker.pkg.dev/PROJECT/REPOSITORY_ID/kubetune-{cpu,gpu,mlflow}."
  default     = "kubetune"
}

variable "keep_recent_versions" {
  type        = number
  description = "Cleanup policy: how many most recent versions of each image to keep; older untagged ones are deleted."
  default     = 20
}

variable "labels" {
  type        = map(string)
  description = "Resource labels of the repository."
  default     = {}
}
