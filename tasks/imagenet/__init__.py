"""ImageNet-1k classification (paper Sec. 5.2, Tables 2, 3, 6) and its Fashion-MNIST stand-in.

``module``: :class:`ImageClassifier`, the LightningModule (mixup/cutmix, label smoothing, EMA,
AdamW + cosine with warm-up, top-1/top-5 for raw and EMA weights). ``data``: DataModules.
``models``: :func:`create_model`, timm's factory with the Chimera-ViT variants registered.
``run``: the train/test driver behind ``scripts/train.py``.
"""
