"""``python -m diffusion_lightning`` runs the command-line interface."""

from diffusion_lightning.cli import main

if __name__ == "__main__":
    main()
