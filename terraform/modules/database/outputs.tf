output "instance_name" {
  description = "Cloud SQL instance name."
  value       = google_sql_database_instance.mlflow.name
}

output "connection_name" {
  description = "PROJECT:REGION:INSTANCE, the Cloud SQL Auth Proxy's instance argument."
  value       = google_sql_database_instance.mlflow.connection_name
}

output "private_ip" {
  description = "Private IP address of the instance."
  value       = google_sql_database_instance.mlflow.private_ip_address
}

output "db_user" {
  description = "PostgreSQL user MLflow connects as."
  value       = google_sql_user.mlflow.name
}

output "db_password" {
  description = "Password of the MLflow database user (goes into the `mlflow-db` Secret; never printed by make)."
  value       = random_password.mlflow.result
  sensitive   = true
}
