# Docker repository for the kubetune images. Tags are git revisions and are immutable, so a tag always names the
# image the pipeline was compiled against.
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption keys are used; a customer-managed KMS key adds key management the project does not need.
  project       = var.project_id
  location      = var.location
  repository_id = var.repository_id
  description   = "kubetune training, pipeline and MLflow images"
  format        = "DOCKER"
  labels        = var.labels

  docker_config {
    immutable_tags = true
  }

  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = var.keep_recent_versions
    }
  }
  cleanup_policies {
    id     = "delete-old-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "1209600s"
    }
  }
}
