"""The demo model: a small SD3-class text-to-image DiT the project trains and ships.

scenes.py makes the data, codec.py maps pixels to a 16-channel latent, text_encoder.py turns
captions into SD3 conditioning, train.py trains both networks into weights/.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_FILE = "fastattn_demo_sd3.safetensors"  # loaded by ComfyUI's UNETLoader as SD3
TEXT_FILE = "fastattn_demo_text.safetensors"
UNET_FILE = "fastattn_demo_sd15_unet.safetensors"  # the demo U-Net (train_unet.py), loaded by UNETLoader as SD 1.5
UNET_TEXT_FILE = "fastattn_demo_sd15_text.safetensors"  # its own caption encoder
