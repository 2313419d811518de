"""captioner: photo in, English sentence out, with the attention map behind each word.

    from captioner import Captioner
    caption = Captioner.load().caption("examples/cat.jpg")
    print(caption.text)
"""
__version__ = "0.2.0"

from captioner.errors import CaptionerError, CheckpointError, ImageError, OptionError  # noqa: E402
from captioner.inference.api import Caption, Captioner  # noqa: E402

__all__ = ["Caption", "Captioner", "CaptionerError", "CheckpointError", "ImageError", "OptionError", "__version__"]
