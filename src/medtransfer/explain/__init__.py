"""Explanations of a trained classifier's decisions: Grad-CAM heatmaps and their overlays on the image."""

from medtransfer.explain.gradcam import grad_cam, overlay, save_overlay

__all__ = ["grad_cam", "overlay", "save_overlay"]
