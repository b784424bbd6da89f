"""Interoperability with other frameworks (Ultralytics YOLOv8)."""
