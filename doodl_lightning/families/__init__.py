"""Model-family specifics (latent layouts, how a family's model is called), kept out of the
model-agnostic samplers."""
