"""Flax models: MobileNetV2 backbone, AE head and the full AE model."""
