"""captioner: photo in, English sentence out, with the attention map behind each word."""
__version__ = "0.1.0"
