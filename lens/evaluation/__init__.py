"""Measuring retrieval: datasets, metrics (recall@k, mAP), evaluation runs, reports, detector checks."""
