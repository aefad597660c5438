"""MLM pretraining: data pipeline (packed sequences, grain iterators) and the training loop."""
