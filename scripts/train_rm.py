"""Train the restoration module (stage-1 SwinIR); see ``diffbir-train-rm --help``."""

from diffbir.training.cli import main_rm

if __name__ == "__main__":
    main_rm()
