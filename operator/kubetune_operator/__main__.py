"""``python -m kubetune_operator``: the same as ``kubetune operator``."""

from kubetune_operator.main import main

main()
