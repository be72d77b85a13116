"""kubetune: LoRA/QLoRA supervised fine-tuning of open LLMs, from one machine to a Kubeflow pipeline on GKE."""
