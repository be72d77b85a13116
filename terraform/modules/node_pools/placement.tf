# The placement contract with the pipeline: the pipeline side (pipelines/placement.py, POOLS) selects nodes by this
# label and tolerates this taint. Node pools take their labels and taints from here and nowhere else;
# tests/infra checks that both sides agree. GKE adds its own `nvidia.com/gpu=present:NoSchedule` taint on GPU nodes.
locals {
  pool_label_key = "kubetune.io/pool"
  pool_label_values = {
    system = "system"
    cpu    = "cpu-c3"
    gpu    = "gpu"
  }
  # Terraform spells the Kubernetes effect `NoSchedule` as NO_SCHEDULE.
  pool_taint_effect = "NO_SCHEDULE"
}
