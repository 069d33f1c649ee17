"""Pipeline exports: onestep's own pipeline folders, stock diffusers folders, model cards."""
