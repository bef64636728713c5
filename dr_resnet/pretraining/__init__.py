"""Self-supervised pretraining on fundus photos: the method, its views, the photos, the command."""
