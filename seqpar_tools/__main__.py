"""``python -m seqpar_tools ...`` = the ``seqpar`` command (the launchers run ``torchrun ... -m seqpar_tools run``)."""

from seqpar_tools.cli import main

if __name__ == "__main__":  # spawned ranks re-import this module as __mp_main__: do nothing there
    raise SystemExit(main())
