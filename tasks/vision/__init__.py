"""Vision: ImageNet-1k classification (paper Sec. 5.2, Tables 2, 3, 6) and its Fashion-MNIST
stand-in, on the shared framework (:mod:`tasks.core`).

``module``: :class:`ImageClassifier` (mixup/cutmix, label smoothing, top-1/top-5).
``data``: DataModules. ``models``: :func:`create_model`, timm's factory with Chimera-ViT.
"""
