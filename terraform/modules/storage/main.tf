# One bucket, four prefixes: pipeline-root/ (KFP artifacts), mlflow/ (MLflow artifacts, served by the tracking
# server), checkpoints/ (training checkpoints, short-lived), cloudbuild-source/ (build contexts,
# short-lived). Uniform access: IAM only, no object ACLs.
resource "google_storage_bucket" "artifacts" {
  #checkov:skip=CKV_GCP_62:Access is audited through Cloud Audit Logs (data access logs); GCS usage logs would need a second bucket for little gain.
  project                     = var.project_id
  name                        = var.bucket_name
  location                    = var.location
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy
  labels                      = var.labels

  versioning {
    enabled = true
  }

  # Checkpoints are only needed to resume a run; drop them after the retention period.
  lifecycle_rule {
    condition {
      age            = var.checkpoint_retention_days
      matches_prefix = ["checkpoints/"]
    }
    action {
      type = "Delete"
    }
  }

  # Cloud Build sources staged by `make images`.
  lifecycle_rule {
    condition {
      age            = 7
      matches_prefix = ["cloudbuild-source/"]
    }
    action {
      type = "Delete"
    }
  }

  # Versioning protects against overwrites; old versions do not need to live forever.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  soft_delete_policy {
    retention_duration_seconds = 604800
  }
}
