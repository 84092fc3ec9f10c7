"""`python -m seg` is the `seg` command (torchrun starts it so: `torchrun ... -m seg train CONFIG`)."""

from seg.cli import main

if __name__ == "__main__":
    main()
