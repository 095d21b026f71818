"""What the project installs as pip packages (real models and corpora), task specs, batching."""
