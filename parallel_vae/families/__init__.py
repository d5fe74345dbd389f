"""One adapter per VAE family: which module of the family's diffusers class gets which treatment, and why."""
