#!/usr/bin/env bash
# Quick start: set up .venv (once), then run the shipped shapes-tiny model on images/shapes.png:
# its caption, its count of the shapes, and its detections drawn into shapes-annotated.png.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/paligemma demo --image images/shapes.png --output shapes-annotated.png
