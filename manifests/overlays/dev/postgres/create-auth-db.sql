-- Runs once, on an empty data directory: MLflow's basic-auth app keeps its users in a database of its own.
CREATE DATABASE mlflow_auth OWNER mlflow;
