"""The recipes' job machinery: model loading, data, video I/O, metrics, and the decode and fine-tune jobs."""
