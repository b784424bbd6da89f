"""Data sets (CUB, COCO json, YOLO txt), the synthetic mini-CUB and augmentation pipelines."""
