"""plugdet detection: config, data, YOLOv8-style neck/head/loss, training and evaluation."""
