"""The demo model: a small SD3-class text-to-image DiT the project trains and ships (v1).

scenes.py makes the data, codec.py maps pixels to a 16-channel latent, text_encoder.py turns
captions into the model's conditioning, train.py trains both networks into weights/,
fidelity.py scores a picture against its caption's ground truth and evaluate.py samples
held-out captions to measure it. train_wan.py is the recipe for v2 (a Wan-class DiT, 12
layers), prepared for a GPU run; its weights do not exist yet, so nothing loads them.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_FILE = "fastattn_demo_sd3.safetensors"  # loaded as SD3 by the FastAttn Demo Model Loader node
TEXT_FILE = "fastattn_demo_text.safetensors"
WAN_FILE = "fastattn_demo_wan.safetensors"  # v2 (train_wan.py), loaded by UNETLoader as Wan 2.1 text-to-video
WAN_TEXT_FILE = "fastattn_demo_wan_text.safetensors"  # v2's caption encoder (context 4096 wide, no pooled vector)
UNET_FILE = "fastattn_demo_sd15_unet.safetensors"  # the demo U-Net (train_unet.py), loaded by UNETLoader as SD 1.5
UNET_TEXT_FILE = "fastattn_demo_sd15_text.safetensors"  # its own caption encoder
# The demo loader's choices (FastAttn Demo Model Loader), each a file in WEIGHTS_DIR.
DEMO_DIT, DEMO_UNET = "DiT (SD3-class)", "U-Net (SD 1.5 layout, for DeepCache)"
DEMO_MODELS = {DEMO_DIT: DIT_FILE, DEMO_UNET: UNET_FILE}
