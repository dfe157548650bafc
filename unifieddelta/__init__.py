"""unifieddelta: edit the delta between a pre-trained and a post-trained model, and predict the loss change."""

__version__ = "0.1.0"
