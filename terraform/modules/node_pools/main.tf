# Three pools: a small always-on system pool, a C3 pool and a GPU pool. The last two scale from zero and carry
# the placement contract's label and NoSchedule taint (placement.tf), so that only the pipeline's tasks that ask
# for them land there and nothing keeps an expensive node alive. They are also the training pools of multi-node
# runs (Kubeflow Trainer TrainJobs, one pod per node): autoscaling up to the node counts a run asks for, gVNIC,
# a compact placement policy in one zone (training_zone) and, on C3 machines large enough, Tier_1 networking. One resource makes all three: what differs
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
    # A compact placement policy type (e.g. "COMPACT"); null: none. Compact placement puts the pool in one zone.
    placement_policy = null
    # Zones of the pool; null: the cluster's.
    node_locations = null
    # gVNIC, Google's virtual NIC (Tier_1 networking needs it).
    gvnic = false
    # Total egress bandwidth tier: "TIER_1" or null (the machine type's default bandwidth).
    network_tier = null
  }

  # Compact placement for the training pools: nodes close together in training_zone, for the all-reduce of every
  # step. GKE supports it on C3 and on the L4 (G2), A100 (A2) and H100 (A3) GPU machines of local.gpu_profiles.
  training_placement = var.compact_placement ? "COMPACT" : null
  training_locations = var.compact_placement ? [var.training_zone] : null

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
      # C3 runs on gVNIC; Tier_1 raises the per-VM egress limit (C3 with 30+ vCPUs only).
      gvnic            = true
      network_tier     = var.cpu_network_tier == "TIER_1" ? "TIER_1" : null
      placement_policy = local.training_placement
      node_locations   = local.training_locations
    }
    gpu = {
      name             = "gpu"
      machine_type     = local.gpu.machine_type
      max_nodes        = var.gpu_max_nodes
      spot             = var.gpu_spot
      disk_size_gb     = var.gpu_disk_size_gb
      image_streaming  = true
      label_value      = local.pool_label_values.gpu
      taint_value      = local.pool_label_values.gpu
      accelerator      = { type = local.gpu.accelerator, count = local.gpu.count }
      gvnic            = true
      placement_policy = local.training_placement
      node_locations   = local.training_locations
    }
  }

  pools = { for key, spec in local.pool_specs : key => merge(local.pool_defaults, spec) }

  # Limits the preconditions below enforce. vCPUs are read from the machine type's name (c3-standard-44 -> 44).
  compact_max_nodes = 150
  tier1_min_vcpus   = 30
  vcpus             = { for key, pool in local.pools : key => try(tonumber(regex("-([0-9]+)(-lssd)?$", pool.machine_type)[0]), 0) }
}

resource "google_container_node_pool" "this" {
  for_each = local.pools

  project        = var.project_id
  name           = each.value.name
  cluster        = var.cluster_id
  location       = var.location
  node_locations = each.value.node_locations

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

  dynamic "network_config" {
    for_each = each.value.network_tier == null ? [] : [each.value.network_tier]
    content {
      network_performance_config {
        total_egress_bandwidth_tier = network_config.value
      }
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

    dynamic "gvnic" {
      for_each = each.value.gvnic ? [true] : []
      content {
        enabled = true
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
    precondition {
      condition     = each.value.placement_policy == null || each.value.max_nodes <= local.compact_max_nodes
      error_message = "Compact placement groups hold at most 150 nodes: lower the training pools' max_nodes or set compact_placement = false."
    }
    precondition {
      condition     = each.value.placement_policy == null || can(regex("^${var.location}-[a-z]$", coalesce(var.training_zone, "-")))
      error_message = "Compact placement puts a pool in one zone: set training_zone to a zone of ${var.location} (e.g. ${var.location}-a) or compact_placement = false."
    }
    precondition {
      condition     = each.value.network_tier == null || (each.value.gvnic && local.vcpus[each.key] >= local.tier1_min_vcpus)
      error_message = "Tier_1 networking needs gVNIC and a C3 machine with at least 30 vCPUs (c3-standard-44 or larger): raise cpu_machine_type or set cpu_network_tier = \"DEFAULT\"."
    }
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
