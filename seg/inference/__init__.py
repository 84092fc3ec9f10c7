"""Prediction without torch: normalisation (`preprocess`), tiles and their blending (`tiling`), the model's
description (`modelinfo`), ONNX Runtime sessions (`runtime`) and the predictor that joins them (`predictor`)."""
