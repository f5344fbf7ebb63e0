"""`python -m densenet_fast bench kernels` as a script (`--help` for the options)."""

from densenet_fast.bench import kernels

if __name__ == "__main__":
    kernels.main()
