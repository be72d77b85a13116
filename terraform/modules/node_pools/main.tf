# Three pools: a small always-on system pool, a C3 pool and a GPU pool. The last two scale from zero and carry
# the placement contract's label and NoSchedule taint (placement.tf), so that only the pipeline's tasks that ask
# for them land there and nothing keeps an expensive node alive. One resource makes all three: what differs
# between pools is data in local.pools, and every pool gets the same hardening (shielded nodes, GKE metadata
# server, no legacy metadata endpoints).

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

  # Every attribute a pool may set, with the value a pool that does not set it gets. merge() gives each pool all
  # of them, so the resource reads each attribute without lookup() and each pool's entry lists only what is its own.
  pool_defaults = {
    min_nodes = 0
    max_nodes = 1
    # true: min/max count per zone (min_node_count); false: across all zones (total_min_node_count).
    per_zone_limits = false
    spot            = false
    disk_size_gb    = 100
    # Image streaming: a multi-GB training image starts before it is fully pulled.
    image_streaming = false
    # The placement contract's label and taint value (placement.tf); null: the label only, no taint.
    taint_value = null
    # { type, count } of the accelerator; null: none.
    accelerator = null
    # A compact placement policy type (e.g. "COMPACT"); null: none.
    placement_policy = null
  }

  pool_specs = {
    system = {
      name            = "system"
      machine_type    = var.system_machine_type
      min_nodes       = 1
      max_nodes       = var.system_max_nodes
      per_zone_limits = true
      label_value     = local.pool_label_values.system
    }
    cpu = {
      name            = "cpu-c3"
      machine_type    = var.cpu_machine_type
      max_nodes       = var.cpu_max_nodes
      spot            = var.cpu_spot
      disk_size_gb    = var.cpu_disk_size_gb
      image_streaming = true
      label_value     = local.pool_label_values.cpu
      taint_value     = local.pool_label_values.cpu
    }
    gpu = {
      name            = "gpu"
      machine_type    = local.gpu.machine_type
      max_nodes       = var.gpu_max_nodes
      spot            = var.gpu_spot
      disk_size_gb    = var.gpu_disk_size_gb
      image_streaming = true
      label_value     = local.pool_label_values.gpu
      taint_value     = local.pool_label_values.gpu
      accelerator     = { type = local.gpu.accelerator, count = local.gpu.count }
    }
  }

  pools = { for key, spec in local.pool_specs : key => merge(local.pool_defaults, spec) }
}

resource "google_container_node_pool" "this" {
  for_each = local.pools

  project  = var.project_id
  name     = each.value.name
  cluster  = var.cluster_id
  location = var.location

  initial_node_count = each.value.min_nodes
  autoscaling {
    min_node_count       = each.value.per_zone_limits ? each.value.min_nodes : null
    max_node_count       = each.value.per_zone_limits ? each.value.max_nodes : null
    total_min_node_count = each.value.per_zone_limits ? null : each.value.min_nodes
    total_max_node_count = each.value.per_zone_limits ? null : each.value.max_nodes
    # Spot capacity is found faster in any zone that has it.
    location_policy = each.value.spot ? "ANY" : "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  dynamic "placement_policy" {
    for_each = each.value.placement_policy == null ? [] : [each.value.placement_policy]
    content {
      type = placement_policy.value
    }
  }

  node_config {
    machine_type    = each.value.machine_type
    disk_type       = "pd-balanced"
    disk_size_gb    = each.value.disk_size_gb
    image_type      = "COS_CONTAINERD"
    spot            = each.value.spot
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    dynamic "guest_accelerator" {
      for_each = each.value.accelerator == null ? [] : [each.value.accelerator]
      content {
        type  = guest_accelerator.value.type
        count = guest_accelerator.value.count
        # GKE installs the driver itself: no NVIDIA driver DaemonSet to maintain.
        gpu_driver_installation_config {
          gpu_driver_version = var.gpu_driver_version
        }
      }
    }

    labels = {
      (local.pool_label_key) = each.value.label_value
    }
    dynamic "taint" {
      for_each = each.value.taint_value == null ? [] : [each.value.taint_value]
      content {
        key    = local.pool_label_key
        value  = taint.value
        effect = local.pool_taint_effect
      }
    }

    dynamic "gcfs_config" {
      for_each = each.value.image_streaming ? [true] : []
      content {
        enabled = true
      }
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

# The pools were three resources (system, cpu, gpu) before they became one: these blocks move an existing cluster's
# pools in the state instead of destroying and recreating them.
moved {
  from = google_container_node_pool.system
  to   = google_container_node_pool.this["system"]
}

moved {
  from = google_container_node_pool.cpu
  to   = google_container_node_pool.this["cpu"]
}

moved {
  from = google_container_node_pool.gpu
  to   = google_container_node_pool.this["gpu"]
}
