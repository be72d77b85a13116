terraform {
  required_version = ">= 1.6"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
  # State is local until you copy backend.tf.example to backend.tf (remote state in GCS, with locking).
}

provider "google" {
  project = var.project_id
  region  = var.region
}
