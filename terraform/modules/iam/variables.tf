variable "project_id" {
  type        = string
  description = "Google Cloud project of the service accounts."
}

variable "name_prefix" {
  type        = string
  description = "Prefix of the service account ids (<prefix>-nodes, -pipeline, -mlflow, -build)."
  default     = "kubetune"
  validation {
    condition     = can(regex("^[a-z][-a-z0-9]{2,20}$", var.name_prefix))
    error_message = "name_prefix must be 3-21 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "bucket_name" {
  type        = string
  description = "Artifacts bucket the pipeline and MLflow read and write."
}

variable "repository_location" {
  type        = string
  description = "Location of the Artifact Registry repository."
}

variable "repository_id" {
  type        = string
  description = "Artifact Registry repository the nodes pull from and Cloud Build pushes to."
}

variable "pipeline_ksa" {
  type = object({
    namespace = string
    name      = string
  })
  description = "Kubernetes service account the pipeline's pods run as (KFP standalone runs them in the kubeflow namespace)."
  default = {
    namespace = "kubeflow"
    name      = "kubetune-pipeline"
  }
}

variable "kfp_default_runner_ksa" {
  type = object({
    namespace = string
    name      = string
  })
  description = "Kubernetes service account KFP runs a pipeline as when the run names none (a run started from the KFP UI); it gets the pipeline's object access to the bucket."
  default = {
    namespace = "kubeflow"
    name      = "pipeline-runner"
  }
}

variable "mlflow_ksa" {
  type = object({
    namespace = string
    name      = string
  })
  description = "Kubernetes service account of the MLflow tracking server."
  default = {
    namespace = "kubetune"
    name      = "mlflow"
  }
}
