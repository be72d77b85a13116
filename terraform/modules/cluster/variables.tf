variable "project_id" {
  type        = string
  description = "Google Cloud project that holds the cluster and its network."
}

variable "region" {
  type        = string
  description = "Region of the regional GKE cluster, its subnet and the Cloud NAT."
}

variable "name" {
  type        = string
  description = "Cluster name; also the prefix of the network, subnet, router and NAT names."
  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$", var.name))
    error_message = "name must be 1-40 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "release_channel" {
  type        = string
  description = "GKE release channel (RAPID, REGULAR or STABLE). Upgrades follow the channel."
  default     = "REGULAR"
  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "node_locations" {
  type        = list(string)
  description = "Zones of the region where nodes run. Empty means every zone GKE picks for the region. Pick zones that offer the C3 and GPU machine types you ask for."
  default     = []
}

variable "subnet_cidr" {
  type        = string
  description = "Primary range of the node subnet."
  default     = "10.10.0.0/20"
}

variable "pods_cidr" {
  type        = string
  description = "Secondary range for pod IPs (VPC-native cluster)."
  default     = "10.20.0.0/14"
}

variable "services_cidr" {
  type        = string
  description = "Secondary range for Service ClusterIPs."
  default     = "10.24.0.0/20"
}

variable "master_ipv4_cidr" {
  type        = string
  description = "/28 range for the control plane's private endpoint."
  default     = "172.16.0.0/28"
}

variable "master_authorized_networks" {
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  description = "Networks allowed to reach the control plane's IP endpoint. kubectl from outside the VPC goes through the DNS endpoint instead (IAM-authorised), so this may stay empty."
  default     = []
}

variable "node_service_account" {
  type        = string
  description = "Email of the least-privilege Google service account the nodes run as (from the iam module)."
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse `terraform destroy` of the cluster while true."
  default     = true
}

variable "labels" {
  type        = map(string)
  description = "Resource labels added to the cluster (billing, ownership)."
  default     = {}
}
