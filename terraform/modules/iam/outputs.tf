output "node_service_account" {
  description = "Email of the nodes' service account."
  value       = google_service_account.nodes.email
}

output "pipeline_service_account" {
  description = "Email of the pipeline's Google service account (the pipeline KSA's Workload Identity annotation)."
  value       = google_service_account.pipeline.email
}

output "mlflow_service_account" {
  description = "Email of MLflow's Google service account (the mlflow KSA's Workload Identity annotation)."
  value       = google_service_account.mlflow.email
}

output "build_service_account" {
  description = "Email of the Cloud Build service account (`gcloud builds submit --service-account`)."
  value       = google_service_account.build.email
}
