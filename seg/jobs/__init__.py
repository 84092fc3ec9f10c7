"""Batch segmentation of folders, globs and lists: the local runner (`batch`), Ray past one machine
(`ray_runner`) and progress bars (`progress`)."""
