"""The demo model: a small Wan-class text-to-image DiT the project trains and ships.

scenes.py makes the data, codec.py maps pixels to a 16-channel latent, text_encoder.py turns
captions into the model's conditioning, train.py trains both networks into weights/,
fidelity.py scores a picture against its caption's ground truth.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_FILE = "fastattn_demo_wan.safetensors"  # loaded by ComfyUI's UNETLoader as Wan 2.1 text-to-video
TEXT_FILE = "fastattn_demo_text.safetensors"
