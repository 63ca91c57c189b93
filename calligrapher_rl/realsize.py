"""python -m calligrapher_rl.realsize --out DIR [--device cuda] | --counts  (see models/realsize.py)."""

from .errors import cli_main
from .models.realsize import main

if __name__ == "__main__":
    cli_main(main)
