"""transformers adapters: model patches and ``TrainerCallback`` s."""
