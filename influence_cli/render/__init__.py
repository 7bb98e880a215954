"""Presentation: terminal tables, HTML/SVG, CSV/JSON files and CI outputs. Nothing here computes a score."""
