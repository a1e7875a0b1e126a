"""Train the generation module (IRControlNet); see ``diffbir-train-gm --help``."""

from diffbir.training.cli import main_gm

if __name__ == "__main__":
    main_gm()
