"""The demo model: a small SD3-class text-to-image DiT the project trains and ships.

scenes.py makes the data, codec.py maps pixels to a 16-channel latent, text_encoder.py turns
captions into SD3 conditioning, train.py trains both networks into weights/.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_FILE = "fastattn_demo_sd3.safetensors"  # loaded as SD3 by the FastAttn Demo Model Loader node
TEXT_FILE = "fastattn_demo_text.safetensors"
