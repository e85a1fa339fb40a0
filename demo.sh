#!/usr/bin/env bash
# Quick start: set up .venv (once), then run the shipped shapes-tiny model on a sample scene:
# its caption, its count of the shapes, and its detections drawn into shapes-annotated.png.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
IMG=images/shapes.png
P=.venv/bin/paligemma
echo "caption:  $($P --image $IMG --task caption --no-stream)"
echo "count:    $($P --image $IMG --task answer --question 'how many shapes?' --no-stream)"
for shape in circle square triangle; do
  echo "detect $shape: $($P --image $IMG --task detect --objects $shape --no-stream --output "shapes-$shape.png" 2>/dev/null)"
done
