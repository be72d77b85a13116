# The dev environment: every module wired together. `make deploy` runs init/apply here.

locals {
  bucket_name = coalesce(var.bucket_name, "${var.project_id}-kubetune-artifacts")
  labels = {
    app = "kubetune"
    env = "dev"
  }
}

resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    # The iam module reads the project number (Workload Identity principals name it).
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
    "storage.googleapis.com",
  ])
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

module "registry" {
  source     = "../../modules/registry"
  project_id = var.project_id
  location   = var.region
  labels     = local.labels
  depends_on = [google_project_service.apis]
}

module "storage" {
  source        = "../../modules/storage"
  project_id    = var.project_id
  location      = var.region
  bucket_name   = local.bucket_name
  force_destroy = var.force_destroy_bucket
  labels        = local.labels
  depends_on    = [google_project_service.apis]
}

module "iam" {
  source              = "../../modules/iam"
  project_id          = var.project_id
  bucket_name         = module.storage.bucket_name
  repository_location = var.region
  repository_id       = module.registry.repository_id
  depends_on          = [google_project_service.apis]
}

module "cluster" {
  source                     = "../../modules/cluster"
  project_id                 = var.project_id
  region                     = var.region
  name                       = var.name
  release_channel            = var.release_channel
  node_locations             = var.node_locations
  master_authorized_networks = var.master_authorized_networks
  node_service_account       = module.iam.node_service_account
  deletion_protection        = var.deletion_protection
  labels                     = local.labels
  depends_on                 = [google_project_service.apis]
}

module "node_pools" {
  source               = "../../modules/node_pools"
  project_id           = var.project_id
  cluster_id           = module.cluster.id
  location             = module.cluster.location
  node_service_account = module.iam.node_service_account
  cpu_machine_type     = var.cpu_machine_type
  cpu_max_nodes        = var.cpu_max_nodes
  cpu_spot             = var.cpu_spot
  gpu_profile          = var.gpu_profile
  gpu_max_nodes        = var.gpu_max_nodes
  gpu_spot             = var.gpu_spot
  compact_placement    = var.compact_placement
  training_zone        = coalesce(var.training_zone, try(var.node_locations[0], null), "${var.region}-a")
  cpu_network_tier     = var.cpu_network_tier
  labels               = local.labels
}

module "database" {
  source              = "../../modules/database"
  project_id          = var.project_id
  region              = var.region
  name                = "${var.name}-mlflow"
  network_id          = module.cluster.network_id
  deletion_protection = var.deletion_protection
  labels              = local.labels
  depends_on          = [google_project_service.apis]
}
