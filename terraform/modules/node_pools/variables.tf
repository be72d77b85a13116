variable "project_id" {
  type        = string
  description = "Google Cloud project of the cluster."
}

variable "cluster_id" {
  type        = string
  description = "Id of the cluster the pools join (cluster module output `id`)."
}

variable "location" {
  type        = string
  description = "Cluster location (region)."
}

variable "node_service_account" {
  type        = string
  description = "Email of the least-privilege Google service account the nodes run as."
}

variable "labels" {
  type        = map(string)
  description = "GCE resource labels for the nodes' VMs (billing, ownership)."
  default     = {}
}

# --- system pool -------------------------------------------------------------------------------------------
variable "system_machine_type" {
  type        = string
  description = "Machine type of the small always-on system pool (kube-system, KFP, MLflow, in-cluster PostgreSQL)."
  default     = "e2-standard-4"
}

variable "system_max_nodes" {
  type        = number
  description = "Autoscaling ceiling of the system pool, per zone (the floor is one node per zone)."
  default     = 2
}

# --- C3 (Sapphire Rapids, AMX) pool -----------------------------------------------------------------------
variable "cpu_machine_type" {
  type        = string
  description = "C3 machine type for CPU training and the CPU stages. C3 is Sapphire Rapids: AMX makes bf16 the fast path."
  default     = "c3-standard-22"
  validation {
    condition     = can(regex("^c3-(standard|highcpu|highmem)-[0-9]+(-lssd)?$", var.cpu_machine_type))
    error_message = "cpu_machine_type must be a C3 (Intel Sapphire Rapids) type, e.g. c3-standard-22; c3d is AMD and has no AMX."
  }
}

variable "cpu_max_nodes" {
  type        = number
  description = "Autoscaling ceiling of the C3 pool (total across zones). The floor is 0: no C3 node runs while no task needs one. A multi-node run (train_nodes = N) needs N nodes at once, one training pod per node; 8 fits the largest CPU run the presets are sized for."
  default     = 8
  validation {
    condition     = var.cpu_max_nodes >= 1
    error_message = "cpu_max_nodes must be at least 1."
  }
}

variable "cpu_spot" {
  type        = bool
  description = "Run the C3 pool on Spot VMs (much cheaper, can be reclaimed: training resumes from its last checkpoint)."
  default     = false
}

variable "cpu_disk_size_gb" {
  type        = number
  description = "Boot disk size of C3 nodes (images, model cache, scratch)."
  default     = 200
}

# --- GPU pool ------------------------------------------------------------------------------------------------
variable "gpu_profile" {
  type        = string
  description = "GPU shape: l4 (g2-standard-8, 1x L4, default), a100 (a2-highgpu-1g, 1x A100 40GB), a100-80gb (a2-ultragpu-1g) or h100 (a3-highgpu-8g, 8x H100 80GB)."
  default     = "l4"
  validation {
    condition     = contains(["l4", "a100", "a100-80gb", "h100"], var.gpu_profile)
    error_message = "gpu_profile must be one of l4, a100, a100-80gb, h100."
  }
}

variable "gpu_machine_type" {
  type        = string
  description = "Overrides the profile's machine type (e.g. g2-standard-24 for 2x L4); null keeps the profile's."
  default     = null
}

variable "gpu_count" {
  type        = number
  description = "Overrides the profile's accelerator count per node; must match the machine type. null keeps the profile's."
  default     = null
}

variable "gpu_max_nodes" {
  type        = number
  description = "Autoscaling ceiling of the GPU pool (total across zones). The floor is 0. A multi-node GPU run (train_nodes = N) needs N nodes at once; check the project's GPU quota in the region covers it."
  default     = 8
  validation {
    condition     = var.gpu_max_nodes >= 1
    error_message = "gpu_max_nodes must be at least 1."
  }
}

variable "gpu_spot" {
  type        = bool
  description = "Run the GPU pool on Spot VMs."
  default     = false
}

variable "gpu_driver_version" {
  type        = string
  description = "NVIDIA driver GKE installs: LATEST or DEFAULT. The GPU image's torch 2.13.0 is built for CUDA 13.0, which needs a 580+ driver: keep LATEST unless you rebuild the image for an older CUDA."
  default     = "LATEST"
  validation {
    condition     = contains(["LATEST", "DEFAULT"], var.gpu_driver_version)
    error_message = "gpu_driver_version must be LATEST or DEFAULT."
  }
}

variable "gpu_disk_size_gb" {
  type        = number
  description = "Boot disk size of GPU nodes."
  default     = 300
}

# --- multi-node training (both training pools) ---------------------------------------------------------------
variable "compact_placement" {
  type        = bool
  description = "Compact placement policy for the C3 and GPU pools: their nodes close together in training_zone, for lower latency between the nodes of a multi-node run. Changing it recreates both pools (they scale from zero, so nothing runs on them while idle)."
  default     = true
}

variable "training_zone" {
  type        = string
  description = "The one zone of the C3 and GPU pools when compact_placement is on (compact placement is zonal), e.g. us-central1-a; pick one that offers both machine types. null: the cluster's zones (only with compact_placement = false)."
  default     = null
}

variable "cpu_network_tier" {
  type        = string
  description = "Egress bandwidth tier of the C3 pool: DEFAULT (the machine type's, 23 Gbps on c3-standard-22) or TIER_1 (per-VM Tier_1 networking, for multi-node training; C3 with at least 30 vCPUs, i.e. c3-standard-44 or larger, billed extra)."
  default     = "DEFAULT"
  validation {
    condition     = contains(["DEFAULT", "TIER_1"], var.cpu_network_tier)
    error_message = "cpu_network_tier must be DEFAULT or TIER_1."
  }
}
