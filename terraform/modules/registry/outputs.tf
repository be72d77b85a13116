output "repository_id" {
  description = "Repository id."
  value       = google_artifact_registry_repository.images.repository_id
}

output "repository_name" {
  description = "Full resource name of the repository (for IAM bindings)."
  value       = google_artifact_registry_repository.images.name
}

output "registry" {
  description = "Image prefix: `make images REGISTRY=...` pushes under it."
  value       = "${var.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}
