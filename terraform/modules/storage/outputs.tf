output "bucket_name" {
  description = "Name of the artifacts bucket."
  value       = google_storage_bucket.artifacts.name
}

output "bucket_url" {
  description = "gs:// URL of the artifacts bucket."
  value       = google_storage_bucket.artifacts.url
}

output "mlflow_artifacts_uri" {
  description = "Where the MLflow server stores artifacts (--artifacts-destination)."
  value       = "${google_storage_bucket.artifacts.url}/mlflow"
}

output "pipeline_root" {
  description = "KFP pipeline root for runs' artifacts."
  value       = "${google_storage_bucket.artifacts.url}/pipeline-root"
}

output "checkpoints_uri" {
  description = "Prefix for training checkpoints (deleted after checkpoint_retention_days)."
  value       = "${google_storage_bucket.artifacts.url}/checkpoints"
}
