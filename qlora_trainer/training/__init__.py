"""The run: SFTTrainer set up from the recipe, its levers, checkpoints, resume, metrics and safeguards."""
