"""Accuracy metrics in pure numpy (mIoU, nuScenes NDS)."""
