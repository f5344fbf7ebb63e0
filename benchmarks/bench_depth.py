"""`python -m densenet_fast bench depth` as a script (`--help` for the options)."""

from densenet_fast.bench import depth

if __name__ == "__main__":
    depth.main()
