"""pumer-plug: plug-in token reduction for vision-language transformers."""
__version__ = "0.1.0"
