# Three pools: a small always-on system pool, a C3 pool and a GPU pool. The last two scale from zero and carry
# the placement contract's label and NoSchedule taint (placement.tf), so that only the pipeline's tasks that ask
# for them land there and nothing keeps an expensive node alive.

locals {
  gpu_profiles = {
    "l4"        = { machine_type = "g2-standard-8", accelerator = "nvidia-l4", count = 1 }
    "a100"      = { machine_type = "a2-highgpu-1g", accelerator = "nvidia-tesla-a100", count = 1 }
    "a100-80gb" = { machine_type = "a2-ultragpu-1g", accelerator = "nvidia-a100-80gb", count = 1 }
    "h100"      = { machine_type = "a3-highgpu-8g", accelerator = "nvidia-h100-80gb", count = 8 }
  }
  gpu = {
    machine_type = coalesce(var.gpu_machine_type, local.gpu_profiles[var.gpu_profile].machine_type)
    accelerator  = local.gpu_profiles[var.gpu_profile].accelerator
    count        = coalesce(var.gpu_count, local.gpu_profiles[var.gpu_profile].count)
  }
}

resource "google_container_node_pool" "system" {
  project  = var.project_id
  name     = "system"
  cluster  = var.cluster_id
  location = var.location

  initial_node_count = 1
  autoscaling {
    min_node_count  = 1
    max_node_count  = var.system_max_nodes
    location_policy = "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.system_machine_type
    disk_type       = "pd-balanced"
    disk_size_gb    = 100
    image_type      = "COS_CONTAINERD"
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels = {
      (local.pool_label_key) = local.pool_label_values.system
    }
    resource_labels = var.labels
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

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

resource "google_container_node_pool" "cpu" {
  project  = var.project_id
  name     = "cpu-c3"
  cluster  = var.cluster_id
  location = var.location

  initial_node_count = 0
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.cpu_max_nodes
    # Spot capacity is found faster in any zone that has it.
    location_policy = var.cpu_spot ? "ANY" : "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.cpu_machine_type
    disk_type       = "pd-balanced"
    disk_size_gb    = var.cpu_disk_size_gb
    image_type      = "COS_CONTAINERD"
    spot            = var.cpu_spot
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    labels = {
      (local.pool_label_key) = local.pool_label_values.cpu
    }
    taint {
      key    = local.pool_label_key
      value  = local.pool_label_values.cpu
      effect = local.pool_taint_effect
    }

    # Image streaming: the multi-GB training image starts before it is fully pulled.
    gcfs_config {
      enabled = true
    }

    resource_labels = var.labels
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

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

resource "google_container_node_pool" "gpu" {
  project  = var.project_id
  name     = "gpu"
  cluster  = var.cluster_id
  location = var.location

  initial_node_count = 0
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.gpu_max_nodes
    location_policy      = var.gpu_spot ? "ANY" : "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = local.gpu.machine_type
    disk_type       = "pd-balanced"
    disk_size_gb    = var.gpu_disk_size_gb
    image_type      = "COS_CONTAINERD"
    spot            = var.gpu_spot
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = local.gpu.accelerator
      count = local.gpu.count
      # GKE installs the driver itself: no NVIDIA driver DaemonSet to maintain.
      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    labels = {
      (local.pool_label_key) = local.pool_label_values.gpu
    }
    taint {
      key    = local.pool_label_key
      value  = local.pool_label_values.gpu
      effect = local.pool_taint_effect
    }

    gcfs_config {
      enabled = true
    }

    resource_labels = var.labels
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

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}
