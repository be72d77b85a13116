variable "project_id" {
  type        = string
  description = "Google Cloud project to deploy into."
}

variable "region" {
  type        = string
  description = "Region of the cluster, bucket, registry and database."
  default     = "us-central1"
}

variable "name" {
  type        = string
  description = "Environment name; prefixes the cluster, network and database names."
  default     = "kubetune-dev"
}

variable "bucket_name" {
  type        = string
  description = "Artifacts bucket name; null means PROJECT_ID-kubetune-artifacts."
  default     = null
}

variable "node_locations" {
  type        = list(string)
  description = "Zones for nodes; empty lets GKE choose. Pick zones that have the C3 and GPU types."
  default     = []
}

variable "release_channel" {
  type        = string
  description = "GKE release channel."
  default     = "REGULAR"
}

variable "master_authorized_networks" {
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  description = "Networks allowed on the control plane's IP endpoint (kubectl uses the DNS endpoint)."
  default     = []
}

variable "cpu_machine_type" {
  type        = string
  description = "C3 machine type of the CPU training pool."
  default     = "c3-standard-22"
}

variable "cpu_max_nodes" {
  type        = number
  description = "Autoscaling ceiling of the C3 pool: at least the largest train_nodes of a CPU run."
  default     = 8
}

variable "cpu_spot" {
  type        = bool
  description = "Spot VMs for the C3 pool."
  default     = false
}

variable "gpu_profile" {
  type        = string
  description = "GPU shape: l4, a100, a100-80gb or h100."
  default     = "l4"
}

variable "gpu_max_nodes" {
  type        = number
  description = "Autoscaling ceiling of the GPU pool: at least the largest train_nodes of a GPU run (GPU quota permitting)."
  default     = 8
}

variable "gpu_spot" {
  type        = bool
  description = "Spot VMs for the GPU pool."
  default     = false
}

variable "compact_placement" {
  type        = bool
  description = "Compact placement for the C3 and GPU pools, in training_zone (multi-node training)."
  default     = true
}

variable "training_zone" {
  type        = string
  description = "Zone of the C3 and GPU pools under compact placement; null: the first of node_locations, else REGION-a."
  default     = null
}

variable "cpu_network_tier" {
  type        = string
  description = "C3 pool egress tier: DEFAULT, or TIER_1 (needs cpu_machine_type c3-standard-44 or larger)."
  default     = "DEFAULT"
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the cluster and the database from deletion."
  default     = true
}

variable "force_destroy_bucket" {
  type        = bool
  description = "Let destroy delete the artifacts bucket with its objects."
  default     = false
}
