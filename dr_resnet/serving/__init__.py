"""Using a trained model: grading from any file, predict, export with a model card, heat maps."""
