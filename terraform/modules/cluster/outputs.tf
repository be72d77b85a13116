output "name" {
  description = "Cluster name (for `gcloud container clusters get-credentials`)."
  value       = google_container_cluster.this.name
}

output "id" {
  description = "Cluster id, projects/P/locations/L/clusters/N (the node_pools module attaches to it)."
  value       = google_container_cluster.this.id
}

output "location" {
  description = "Cluster location (the region)."
  value       = google_container_cluster.this.location
}

output "network_id" {
  description = "Self link of the cluster's VPC (Cloud SQL's private IP is peered into it)."
  value       = google_compute_network.this.id
}

output "workload_pool" {
  description = "Workload Identity pool, PROJECT.svc.id.goog."
  value       = "${var.project_id}.svc.id.goog"
}

output "dns_endpoint" {
  description = "The control plane's DNS endpoint (kubectl goes through it)."
  value       = google_container_cluster.this.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint
}
