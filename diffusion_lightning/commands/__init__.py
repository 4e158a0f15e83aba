"""Commands of ``diffusion-lightning`` that run outside LightningCLI's Trainer subcommands."""
