"""Evaluation reports: scores, baselines, plots, the document model, the k-fold reports."""
