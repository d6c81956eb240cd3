"""One module per `medlsam` subcommand; each defines `add_parser(subparsers)`."""


def add_box_margin_options(parser) -> None:
    """`--margin` (voxels) and `--margin-mm` (in-plane mm), shared by `segment` and `eval`."""
    from medlsam.segment import DEFAULT_IN_PLANE_MARGIN_MM, PAPER_MARGIN_ZYX, parse_margin_mm

    parser.add_argument("--margin", type=int, nargs=3, default=PAPER_MARGIN_ZYX, metavar=("Z", "Y", "X"),
                        help="voxels added to each 3D box before slicing (paper: 2 10 10; Y X give way to --margin-mm)")
    parser.add_argument("--margin-mm", type=parse_margin_mm, default=DEFAULT_IN_PLANE_MARGIN_MM, metavar="MM",
                        help="in-plane margin of each box in mm (default %(default)s: the paper's 10 pixels on "
                        "~0.8 mm slices); 'px' uses the Y X voxels of --margin instead")


def add_prompting_options(parser) -> None:
    """`--prompting` and the propagation settings, shared by `segment` and `eval` (defaults: the app's)."""
    from medlsam.segment import DEFAULT_PROMPTING, PROMPTING, PropagationSettings
    from medlsam.segment.key_slices import DEFAULT_KEY_SLICE_MM

    defaults = PropagationSettings()
    parser.add_argument("--prompting", choices=PROMPTING, default=DEFAULT_PROMPTING,
                        help="box (default): every slice of a 3D box gets its whole in-plane extent (the paper's "
                        "way); propagate (experimental): each slice's box prompt follows the organ from a start "
                        "slice and stops where it ends")
    parser.add_argument("--step-mm", type=float, default=defaults.step_mm, metavar="MM",
                        help="propagate: segment key slices about this far apart and interpolate between them "
                        "(default %(default)s; 0 = every slice)")
    parser.add_argument("--key-slice-mm", type=float, default=DEFAULT_KEY_SLICE_MM, metavar="MM",
                        help="box: segment slices about this far apart (and each organ's end slices) and "
                        "interpolate between them (default %(default)s; 0 = every slice)")
    parser.add_argument("--walk-margin-mm", type=float, default=defaults.margin_mm, metavar="MM",
                        help="propagate: margin around the previous slice's mask box (default %(default)s)")
    parser.add_argument("--min-score", type=float, default=defaults.min_score,
                        help="propagate: a walk ends below this predicted IoU (default %(default)s)")


def propagation_from_args(args):
    """The PropagationSettings of `add_prompting_options`' arguments."""
    from medlsam.segment import PropagationSettings

    return PropagationSettings(margin_mm=args.walk_margin_mm, min_score=args.min_score, step_mm=args.step_mm)
