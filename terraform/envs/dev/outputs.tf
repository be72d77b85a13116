output "cluster_name" {
  description = "GKE cluster name."
  value       = module.cluster.name
}

output "cluster_location" {
  description = "GKE cluster location."
  value       = module.cluster.location
}

output "registry" {
  description = "Image prefix for `make images REGISTRY=...`."
  value       = module.registry.registry
}

output "bucket_url" {
  description = "Artifacts bucket."
  value       = module.storage.bucket_url
}

output "pipeline_root" {
  description = "KFP pipeline root in the artifacts bucket."
  value       = module.storage.pipeline_root
}

output "build_service_account" {
  description = "Service account Cloud Build runs as."
  value       = module.iam.build_service_account
}

output "placement" {
  description = "Node labels and taints of the C3 and GPU pools (the pipeline's placement contract)."
  value       = module.node_pools.placement
}

output "mlflow_db_password" {
  description = "Password of the MLflow database user; `make deploy` puts it into the mlflow-db Secret."
  value       = module.database.db_password
  sensitive   = true
}

# The values the Kubernetes manifests need, in the KEY=VALUE format of manifests/overlays/*/infra.env.
# `make deploy` writes this into its copy of the overlay; nothing in it is secret.
output "kubetune_infra_env" {
  description = "Contents of infra.env for the kustomize overlays."
  value       = <<-EOT
    PIPELINE_GSA=${module.iam.pipeline_service_account}
    MLFLOW_GSA=${module.iam.mlflow_service_account}
    MLFLOW_ARTIFACTS_DESTINATION=${module.storage.mlflow_artifacts_uri}
    PIPELINE_ROOT=${module.storage.pipeline_root}
    CHECKPOINTS_URI=${module.storage.checkpoints_uri}
    CLOUDSQL_INSTANCE=${module.database.connection_name}
  EOT
}
