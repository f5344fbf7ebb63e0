"""`python -m densenet_fast bench models` as a script (`--help` for the options)."""

from densenet_fast.bench import models

if __name__ == "__main__":
    models.main()
