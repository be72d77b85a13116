# Least privilege: one Google service account per workload, each granted only what it uses, on the narrowest
# resource that IAM allows (the bucket, the repository) rather than the project. Pods get their Google identity
# through Workload Identity: no key files anywhere.

locals {
  workload_pool = "${var.project_id}.svc.id.goog"
  # Workload Identity Federation for GKE names a Kubernetes service account directly as an IAM principal, without
  # a Google service account to impersonate (and without an annotation on the Kubernetes side).
  kfp_default_runner_principal = format(
    "principal://iam.googleapis.com/projects/%s/locations/global/workloadIdentityPools/%s/subject/ns/%s/sa/%s",
    data.google_project.this.number,
    local.workload_pool,
    var.kfp_default_runner_ksa.namespace,
    var.kfp_default_runner_ksa.name,
  )
}

data "google_project" "this" {
  project_id = var.project_id
}

resource "google_service_account" "nodes" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-nodes"
  display_name = "kubetune GKE nodes"
  description  = "Node VMs: logs, metrics, image pulls. Pods never use it (Workload Identity is on)."
}

resource "google_service_account" "pipeline" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-pipeline"
  display_name = "kubetune pipeline tasks"
  description  = "KFP pipeline pods: artifacts and checkpoints in the artifacts bucket."
}

resource "google_service_account" "mlflow" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-mlflow"
  display_name = "kubetune MLflow tracking server"
  description  = "MLflow server: artifacts under gs://BUCKET/mlflow, Cloud SQL through the Auth Proxy."
}

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-build"
  display_name = "kubetune image builds"
  description  = "Cloud Build: reads the uploaded source, pushes images to the repository."
}

# --- project and repository grants -------------------------------------------------------------------------
# Project-wide roles only where IAM has nothing narrower: the node role, Cloud SQL client, writing build logs.
resource "google_project_iam_member" "this" {
  for_each = {
    nodes_default          = { role = "roles/container.defaultNodeServiceAccount", member = google_service_account.nodes.member }
    mlflow_cloudsql_client = { role = "roles/cloudsql.client", member = google_service_account.mlflow.member }
    build_logs             = { role = "roles/logging.logWriter", member = google_service_account.build.member }
  }
  project = var.project_id
  role    = each.value.role
  member  = each.value.member
}

# Nodes pull images; Cloud Build pushes them.
resource "google_artifact_registry_repository_iam_member" "this" {
  for_each = {
    nodes_pull = { role = "roles/artifactregistry.reader", member = google_service_account.nodes.member }
    build_push = { role = "roles/artifactregistry.writer", member = google_service_account.build.member }
  }
  project    = var.project_id
  location   = var.repository_location
  repository = var.repository_id
  role       = each.value.role
  member     = each.value.member
}

# Each of these grants was a resource of its own before the two above: the moved blocks keep them in the state.
moved {
  from = google_project_iam_member.nodes_default
  to   = google_project_iam_member.this["nodes_default"]
}

moved {
  from = google_project_iam_member.mlflow_cloudsql_client
  to   = google_project_iam_member.this["mlflow_cloudsql_client"]
}

moved {
  from = google_project_iam_member.build_logs
  to   = google_project_iam_member.this["build_logs"]
}

moved {
  from = google_artifact_registry_repository_iam_member.nodes_pull
  to   = google_artifact_registry_repository_iam_member.this["nodes_pull"]
}

moved {
  from = google_artifact_registry_repository_iam_member.build_push
  to   = google_artifact_registry_repository_iam_member.this["build_push"]
}

# --- pipeline ------------------------------------------------------------------------------------------------
resource "google_storage_bucket_iam_member" "pipeline_objects" {
  bucket = var.bucket_name
  role   = "roles/storage.objectUser"
  member = google_service_account.pipeline.member
}

resource "google_service_account_iam_member" "pipeline_workload_identity" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.pipeline_ksa.namespace}/${var.pipeline_ksa.name}]"
}

# A run started from the KFP UI with the form's service account left empty runs as KFP's default runner, not as
# kubetune-pipeline. Its train pods mount the checkpoint volume (the bucket through the GCS FUSE CSI driver, which
# authenticates as the pod's service account), so that account needs the same object access.
resource "google_storage_bucket_iam_member" "kfp_default_runner_objects" {
  bucket = var.bucket_name
  role   = "roles/storage.objectUser"
  member = local.kfp_default_runner_principal
}

# --- MLflow --------------------------------------------------------------------------------------------------
resource "google_storage_bucket_iam_member" "mlflow_objects" {
  bucket = var.bucket_name
  role   = "roles/storage.objectUser"
  member = google_service_account.mlflow.member
}

resource "google_service_account_iam_member" "mlflow_workload_identity" {
  service_account_id = google_service_account.mlflow.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.mlflow_ksa.namespace}/${var.mlflow_ksa.name}]"
}

# --- Cloud Build ---------------------------------------------------------------------------------------------
# `make images` stages the build context under gs://BUCKET/cloudbuild-source/.
resource "google_storage_bucket_iam_member" "build_source" {
  bucket = var.bucket_name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member
}
