"""calligrapher-rl: online RL fine-tuning of the Calligrapher style adapter on FLUX.1-Fill."""

__version__ = "0.1.0"
