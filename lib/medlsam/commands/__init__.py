"""One module per `medlsam` subcommand; each defines `add_parser(subparsers)`."""


def add_box_margin_options(parser) -> None:
    """`--margin` (voxels) and `--margin-mm` (in-plane mm), shared by `segment` and `eval`."""
    from medlsam.segment import DEFAULT_IN_PLANE_MARGIN_MM, PAPER_MARGIN_ZYX, parse_margin_mm

    parser.add_argument("--margin", type=int, nargs=3, default=PAPER_MARGIN_ZYX, metavar=("Z", "Y", "X"),
                        help="voxels added to each 3D box before slicing (paper: 2 10 10; Y X give way to --margin-mm)")
    parser.add_argument("--margin-mm", type=parse_margin_mm, default=DEFAULT_IN_PLANE_MARGIN_MM, metavar="MM",
                        help="in-plane margin of each box in mm (default %(default)s: the paper's 10 pixels on "
                        "~0.8 mm slices); 'px' uses the Y X voxels of --margin instead")
