"""`paligemma demo`: the shipped model on a sample scene, with no download.

Loads the model once, prints its caption and its count of the shapes, detects each kind of shape it
knows (`detect circle`, `detect square`, `detect triangle`, the prompts it was trained on) and draws all
boxes into one picture. With `--image` it runs on your own picture; without, on `images/shapes.png`
when run from a checkout, else on a freshly generated synthetic scene.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .common import CliParser, load_checkpoint, model_dir

SAMPLE = Path(__file__).resolve().parents[2] / "images" / "shapes.png"


def main(argv: Sequence[str] | None = None, prog: str = "paligemma demo") -> int:
    from .. import api
    from ..draw import annotate
    from ..images import as_image
    from ..shapes.synthetic import SHAPES, make_scene
    from ..tasks import ParseResult

    parser = CliParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the shipped shapes-tiny)")
    parser.add_argument("--image", metavar="IMG", help="picture to run on (default: images/shapes.png)")
    parser.add_argument("--output", metavar="PNG", default="shapes-annotated.png",
                        help="where to draw the detections (default: shapes-annotated.png)")
    args = parser.parse_args(list(argv or []))

    model, processor = load_checkpoint(model_dir(args.model), None, "cpu")
    if args.image:
        image, source = as_image(args.image), args.image
    elif SAMPLE.is_file():
        image, source = as_image(SAMPLE), str(SAMPLE)
    else:
        image, source = make_scene(seed=0).image, "a synthetic scene (seed 0)"
    print(f"image:    {source}")
    print(f"caption:  {api.caption(model, processor, image)}")
    print(f"count:    {api.answer(model, processor, image, 'how many shapes?')}")
    found = ParseResult([], [])
    for shape in SHAPES:
        result = api.detect(model, processor, image, shape)
        found.objects.extend(result.objects)
        found.problems.extend(result.problems)
    for obj in found.objects:
        print(f"detected: {obj.label:8s} box (x0, y0, x1, y1) = ({', '.join(f'{v:.1f}' for v in obj.box)})")
    for problem in found.problems:
        print(f"warning:  {problem}")
    out = Path(args.output)
    try:
        annotate(image, found.objects).save(out)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write {out}: {e}") from None
    print(f"drawn:    {out} ({image.width}x{image.height})")
    return 0
