# GKE Standard cluster with private nodes, Workload Identity, shielded nodes and a release channel, in its own
# VPC. Nodes have no external IPs, so a Cloud NAT gives them egress (model hub, package indexes); Google APIs
# (Artifact Registry, GCS) go through Private Google Access. All node pools (system, C3, GPU) live in the
# node_pools module.

resource "google_compute_network" "this" {
  project                 = var.project_id
  name                    = "${var.name}-vpc"
  auto_create_subnetworks = false
}

# GKE adds the rules its nodes and control plane need; anything else from outside is denied explicitly (and logged)
# instead of relying on the implied deny.
resource "google_compute_firewall" "deny_external_ingress" {
  project   = var.project_id
  name      = "${var.name}-deny-external-ingress"
  network   = google_compute_network.this.id
  direction = "INGRESS"
  priority  = 65534

  source_ranges = ["0.0.0.0/0"]
  deny {
    protocol = "all"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_subnetwork" "nodes" {
  project                  = var.project_id
  name                     = "${var.name}-nodes"
  region                   = var.region
  network                  = google_compute_network.this.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_router" "this" {
  project = var.project_id
  name    = "${var.name}-router"
  region  = var.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  project                            = var.project_id
  name                               = "${var.name}-nat"
  router                             = google_compute_router.this.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

resource "google_container_cluster" "this" {
  #checkov:skip=CKV_GCP_24:PodSecurityPolicy was removed in Kubernetes 1.25; Pod Security admission replaces it.
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Workspace domain with a gke-security-groups group, which a standalone project does not have.
  #checkov:skip=CKV_GCP_12:Dataplane V2 (ADVANCED_DATAPATH) enforces NetworkPolicy natively; the network_policy block (Calico) must stay off with it.
  #checkov:skip=CKV_GCP_66:Binary Authorization needs an attestor pipeline the project does not run; images come only from its own Artifact Registry, pinned by tag.
  provider = google
  project  = var.project_id
  name     = var.name
  location = var.region

  node_locations = length(var.node_locations) > 0 ? var.node_locations : null

  # Node pools are managed separately (node_pools module); the default pool is removed right after creation.
  remove_default_node_pool = true
  initial_node_count       = 1

  network         = google_compute_network.this.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Dataplane V2 enforces the NetworkPolicies in manifests/ (only pipeline pods and the KFP UI reach MLflow).
  datapath_provider = "ADVANCED_DATAPATH"

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.master_ipv4_cidr
  }

  # kubectl from a workstation uses the DNS endpoint: reachable from anywhere, every call authorised by IAM,
  # so no operator IP has to be allow-listed (`gcloud container clusters get-credentials --dns-endpoint`).
  control_plane_endpoints_config {
    dns_endpoint_config {
      allow_external_traffic = true
    }
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  release_channel {
    channel = var.release_channel
  }

  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  enable_legacy_abac          = false

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }

  addons_config {
    gcs_fuse_csi_driver_config {
      enabled = true
    }
  }

  # The removed default pool still needs a hardened node_config while it exists.
  node_config {
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    metadata = {
      disable-legacy-endpoints = "true"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }

  resource_labels     = var.labels
  deletion_protection = var.deletion_protection

  lifecycle {
    # The default pool's node_config only matters at creation; changing it later would recreate the cluster.
    ignore_changes = [node_config]
  }
}
