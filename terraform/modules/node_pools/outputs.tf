output "placement" {
  description = "The placement contract as applied: label key, and label value and taint per pool (taint effect in Kubernetes spelling)."
  value = {
    for pool in ["cpu", "gpu"] : pool => {
      label_key    = local.pool_label_key
      label_value  = local.pool_label_values[pool]
      taint_effect = "NoSchedule"
    }
  }
}

output "cpu_pool_name" {
  description = "Name of the C3 node pool."
  value       = google_container_node_pool.this["cpu"].name
}

output "gpu_pool_name" {
  description = "Name of the GPU node pool."
  value       = google_container_node_pool.this["gpu"].name
}

output "gpu_shape" {
  description = "Machine type, accelerator type and count per node of the GPU pool."
  value       = local.gpu
}
